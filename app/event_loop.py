"""The event loop Ferry's processes run on: uvloop (libuv), set before anything makes a loop.

libuv's loop spends less CPU per socket event than asyncio's default loop, which tells on the
worker, whose loop is busy with thousands of sockets (the drain rates on each loop are in
docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio

import uvloop


def use_uvloop() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
