"""The ``scale`` scenario: completed jobs a second with 1, 2 and 3 worker processes on the
three-node cluster, and the CPU each kind of process spends per completed job.

Each step runs its own stack (fresh topics at three replicas): the API, N workers, the recording
fake provider answering after 200 ms, and submits offered at a fixed rate above what one worker
completes. Jobs completed in the measured window are the provider calls answered in it (each
job's outcome follows its answer by milliseconds); CPU is read from /proc for the API, each
worker and each broker over the same window. From CPU per job the result projects what more
cores would give: on this box every process shares two cores, so the curve flattens where the
sum of their CPU per job fills them.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.load import CHAT
from bench.stack import RecordingFake, Sampler, Stack, marked_body, pid_of, stack_settings, wait_all_terminal, wait_port
from deploy.kafka.cluster import LocalKafkaCluster
from deploy.processes import free_port


@dataclass
class Scale:
    """The plan: offered rate, how long, the worker counts tried, and the provider's latency."""

    rate: int = 400
    seconds: float = 20
    warmup_seconds: float = 5  # not measured: the workers' first assignment and connections
    workers: tuple[int, ...] = (1, 2, 3)
    provider_latency: float = 0.2


async def scenario_scale(cluster: LocalKafkaCluster, workdir: Path, plan: Scale) -> dict:
    await asyncio.to_thread(cluster.start)
    steps = {f"workers_{count}": await _step(cluster, workdir, plan, count) for count in plan.workers}
    return {"plan": plan.__dict__ | {"workers": list(plan.workers)}, "cores": os.cpu_count(), **steps}


async def _step(cluster: LocalKafkaCluster, workdir: Path, plan: Scale, workers: int) -> dict:
    fake_port = free_port()
    settings = stack_settings(cluster.bootstrap_servers, fake_port)
    stack = Stack(settings, workdir / f"scale-{workers}")
    ids: list[str] = []
    refused = 0
    try:
        fake = RecordingFake(stack, fake_port, plan.provider_latency)
        await wait_port(fake_port)
        api, url = await stack.api()
        running = [await stack.worker() for _ in range(workers)]
        pids = {"api": pid_of(api), **{f"worker_{n}": pid_of(w) for n, w in enumerate(running, 1)},
                **{f"broker_{n}": pid for n, pid in cluster.running().items() if pid is not None}}
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:
            began = time.monotonic()
            window = (began + plan.warmup_seconds, began + plan.seconds)
            cpu_at: dict[str, dict[str, float]] = {}

            async def sample_cpu() -> None:
                for edge, moment in zip(("start", "end"), window, strict=True):
                    await asyncio.sleep(max(0.0, moment - time.monotonic()))
                    cpu_at[edge] = {name: Sampler.read(pid)[1] for name, pid in pids.items()}

            async def submit(number: int) -> None:
                nonlocal refused
                async with session.post(CHAT, data=marked_body(f"job-{number}", 200),
                                        headers={"Content-Type": "application/json"}) as reply:
                    if reply.status == 202:
                        ids.append((await reply.json())["id"])
                    else:
                        refused += 1

            sampler = asyncio.create_task(sample_cpu())
            submits = []
            for number in range(int(plan.rate * plan.seconds)):
                delay = began + number / plan.rate - time.monotonic()  # open loop
                if delay > 0:
                    await asyncio.sleep(delay)
                submits.append(asyncio.create_task(submit(number)))
            await asyncio.gather(*submits)
            await sampler
        calls = await fake.final()
        await wait_all_terminal(url, ids)  # nothing lost: every accepted job ends
    finally:
        await stack.close()
    answered = [call for call in calls if call[0] and call[2] is not None and window[0] <= call[2] <= window[1]]
    span = window[1] - window[0]
    per_job = {name: round(1000 * (cpu_at["end"][name] - cpu_at["start"][name]) / max(1, len(answered)), 3)
               for name in pids}
    kinds = {kind: round(sum(ms for name, ms in per_job.items() if name.startswith(kind)), 3)
             for kind in ("api", "worker", "broker")}
    total = sum(kinds.values())
    return {"offered_per_s": plan.rate, "accepted": len(ids), "refused": refused,
            "completed_per_s": round(len(answered) / span, 1), "window_s": span,
            "cpu_ms_per_job": per_job, "cpu_ms_per_job_by_kind": kinds, "cpu_ms_per_job_total": round(total, 3),
            # Jobs a second a core could complete if nothing else ran on it: the projection per core added.
            "projected_per_s_per_core": round(1000 / total, 1) if total else None}
