"""Scenario ``mixed``: a throttled provider with a deep backlog beside one at full speed.

Issue 16's head-of-line test: the ``throttled`` provider is limited to ``per_minute`` call starts
a minute (Ferry's ``requests_per_minute``) and ``backlog`` of its jobs are queued; then the
``fast`` provider's jobs are offered at ``rate`` for ``seconds``. The fast provider's figures are
taken twice on the same stack: alone first, then beside the throttled backlog (issue 16's
target: the second within 10 % of the first, which the providers' lanes, ``workers/lanes.py``,
are for); a job that waits longer than
``max_wait`` is recorded as not done (status 1) rather than waited for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.stack import (
    Stack,
    latency_summary,
    run_load,
    stack_settings,
    submit_many,
    wait_all_terminal,
    wait_port,
)
from deploy.processes import free_port

FAST, THROTTLED = "fast/gpt-4o-mini", "throttled/gpt-4o-mini"


@dataclass
class Mixed:
    per_minute: int = 60  # the throttled provider's call starts a minute
    backlog: int = 3000  # its jobs queued before the fast load (more than the worker's 2,000 slots)
    rate: int = 100  # the fast provider's jobs offered a second
    seconds: float = 15
    max_wait: float = 30  # a fast job not done by then counts as not done


async def scenario_mixed(bootstrap: str, workdir: Path, plan: Mixed) -> dict:
    throttled_port, fast_port = free_port(), free_port()
    providers = {"throttled": {"base_url": f"http://127.0.0.1:{throttled_port}/v1",
                               "requests_per_minute": plan.per_minute},
                 "fast": {"base_url": f"http://127.0.0.1:{fast_port}/v1"}}
    stack = Stack(stack_settings(bootstrap, fast_port, providers=providers), workdir)
    fast_load = ("--model", FAST, "--rate", str(plan.rate), "--seconds", str(plan.seconds),
                 "--max-wait", str(plan.max_wait))
    try:
        for port in (throttled_port, fast_port):
            stack.fake_provider(port, 0.0)
            await wait_port(port)
        _, url = await stack.api()
        worker = await stack.worker()
        await wait_all_terminal(url, await submit_many(url, 50, concurrency=10, model=FAST))  # warm-up
        alone = await asyncio.to_thread(run_load, workdir, "e2e", "--url", url, *fast_load)
        queued = await submit_many(url, plan.backlog, model=THROTTLED)
        beside = await asyncio.to_thread(run_load, workdir, "e2e", "--url", url, *fast_load)
        async with aiohttp.ClientSession() as session:  # what the throttled backlog was doing meanwhile
            async with session.get(f"http://127.0.0.1:{worker.web_port}/health") as reply:
                health = await reply.json()
    finally:
        await stack.close()
    alone_s, beside_s = latency_summary(alone, 200), latency_summary(beside, 200)
    return {"plan": plan.__dict__, "throttled_jobs_queued": len(queued),
            "throttled_jobs_waiting_at_end": health["waiting"], "worker_calls_in_flight_at_end": health["in_flight"],
            "fast_alone": alone_s, "fast_beside_throttled_backlog": beside_s,
            "fast_completed_ratio": round(beside_s["ok"] / alone_s["ok"], 3) if alone_s["ok"] else None,
            "fast_p50_ratio": (round(beside_s["p50_ms"] / alone_s["p50_ms"], 2)
                               if alone_s["p50_ms"] and beside_s["p50_ms"] else None)}
