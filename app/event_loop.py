"""The event loop Ferry's processes run on: uvloop (libuv), set before anything makes a loop.

Measured on the worker, whose loop is busy with thousands of sockets: a 20,000-job backlog
drained at 395 jobs/s on uvloop and 367 jobs/s on asyncio's default loop, worker as shipped
(docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio

import uvloop


def use_uvloop() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
