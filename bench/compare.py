"""Scenario ``compare``: Ferry and another implementation of the async API, the same load on each.

    python -m bench.run --scenarios compare --compare-url http://127.0.0.1:8080 \\
        [--compare-model openai/gpt-4o-mini] [--compare-header "Authorization: Bearer ..."] \\
        [--fake-port 18099] [--compare-pid PID]

The harness starts the fake OpenAI-compatible provider on ``--fake-port`` (zero latency) before
anything else: point the other gateway's OpenAI provider at ``http://127.0.0.1:<port>/v1`` and name
it in ``--compare-model``. Ferry runs as shipped (API, one worker, the broker the run uses) against
the same fake, then is stopped; then the other gateway gets the same loads: the warm-up, end to end
at each of ``--rates`` (submit, then poll until 200), and the closed-loop submit with 64 clients.
With ``--compare-pid`` the other process's CPU is sampled as Ferry's are. Both sides' figures land
side by side in the run's ``results.json`` under ``scenarios.compare``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.stack import Sampler, Stack, latency_summary, pid_of, run_load, stack_settings, wait_port

DEFAULT_FAKE_PORT = 18099


@dataclass
class Compare:
    url: str  # the other implementation's base URL
    model: str = "fake/gpt-4o-mini"  # the model it routes to the fake provider
    headers: list[tuple[str, str]] = field(default_factory=list)  # (name, value), sent with every request to it
    fake_port: int = DEFAULT_FAKE_PORT
    pid: int | None = None  # the other process, for its CPU


async def reachable(url: str) -> None:
    """Fail early, and clearly, when nothing answers at the other gateway's URL."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(url) as reply:
                await reply.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SystemExit(f"compare: nothing answers at {url} ({type(exc).__name__}: {exc})") from None


async def measure(workdir: Path, url: str, sizes, pids: dict[str, int], *extra: str) -> dict[str, Any]:
    """The warm-up, end to end at each rate, then submit: one side's figures."""
    figures: dict[str, Any] = {}
    warmup = await asyncio.to_thread(run_load, workdir, "e2e", "--url", url, "--rate", str(sizes.warmup_rate),
                                     "--seconds", str(sizes.warmup_seconds), *extra)
    figures["warmup"] = latency_summary(warmup, 200) | {"offered_per_second": sizes.warmup_rate}
    for rate in sizes.rates:
        with Sampler(pids) as sampler:
            load = await asyncio.to_thread(run_load, workdir, "e2e", "--url", url, "--rate", str(rate),
                                           "--seconds", str(sizes.seconds), *extra)
        figures[f"e2e_rate_{rate}"] = latency_summary(load, 200) | {"offered_per_second": rate} | {
            name: sampler.summary(name) for name in pids}
    with Sampler(pids) as sampler:
        load = await asyncio.to_thread(run_load, workdir, "submit", "--url", url, "--seconds", str(sizes.seconds),
                                       "--concurrency", str(sizes.concurrency), *extra)
    figures["submit"] = latency_summary(load, 202) | {name: sampler.summary(name) for name in pids}
    return figures


async def scenario_compare(bootstrap: str, workdir: Path, sizes, plan: Compare) -> dict:
    await reachable(plan.url)
    fake_url = f"http://127.0.0.1:{plan.fake_port}/v1"
    stack = Stack(stack_settings(bootstrap, plan.fake_port), workdir)
    results: dict[str, Any] = {"fake_provider": fake_url, "rates": list(sizes.rates)}
    try:
        stack.fake_provider(plan.fake_port, 0.0)
        await wait_port(plan.fake_port)
        api, url = await stack.api()
        worker = await stack.worker()
        results["ferry"] = {"url": url} | await measure(workdir, url, sizes,
                                                       {"api": pid_of(api), "worker": pid_of(worker)})
        for process in (api, worker):  # the other side runs alone; the fake stays up for it
            process.terminate(30)
        extra = ["--model", plan.model]
        for name, value in plan.headers:
            extra += ["--header", f"{name}: {value}"]
        results["other"] = {"url": plan.url, "model": plan.model} | await measure(
            workdir, plan.url, sizes, {"other": plan.pid} if plan.pid else {}, *extra)
    finally:
        await stack.close()
    return results
