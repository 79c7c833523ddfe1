"""How Ferry's processes run: on uvloop, with the garbage collector set for a busy server.

libuv's loop spends less CPU per socket event than asyncio's default loop, which tells on the
worker, whose loop is busy with thousands of sockets (the drain rates on each loop are in
docs/benchmarks.md).

Python's cyclic garbage collector, at its defaults (a young collection every 700 net
allocations), took 11 % of the worker's CPU in a backlog drain and about 20 % with 4,000 calls
in flight, and each full collection paused the loop for 100-160 ms: every job allocates
hundreds of objects, and the ones that live for a call get promoted and scanned again and
again. Collections here are rarer (``THRESHOLDS``), and what start-up built (modules, the
app, its settings) is frozen out of every collection. Reference counting still frees almost
everything at once; the collector only finds cycles, later.
"""

from __future__ import annotations

import asyncio
import gc

import uvloop

# Young collections every 50,000 net allocations; older ones as rarely as Python's own ratio.
THRESHOLDS = (50_000, 20, 20)


def use_uvloop() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_garbage_collector() -> None:
    """Collect rarely: call once, at the start of a server process."""
    gc.set_threshold(*THRESHOLDS)


def freeze_start_up_objects() -> None:
    """Leave what exists now out of every later collection: call once start-up has built the app."""
    gc.collect()
    gc.freeze()
