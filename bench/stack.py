"""Running Ferry's real stack for a benchmark: its processes, the recording fake provider, and
the client side (submits, polls, percentiles, CPU and memory samples) the scenarios share."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient

from app.kafka_clients import client_options
from app.settings import Settings
from bench.load import CHAT
from deploy.processes import REPO_ROOT, FerryProcess, free_port


class Sampler:
    """RSS and CPU of some processes, sampled from /proc every ``interval`` seconds."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        self.pids = pids
        self.interval = interval
        self.series: dict[str, list[tuple[float, float, float]]] = {name: [] for name in pids}  # t, MB, cpu s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._began = time.monotonic()

    @staticmethod
    def read(pid: int) -> tuple[float, float]:
        with open(f"/proc/{pid}/status") as status:
            rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self._began
            for name, pid in self.pids.items():
                try:
                    rss, cpu = self.read(pid)
                except (OSError, StopIteration):
                    continue
                self.series[name].append((round(now, 2), round(rss, 1), round(cpu, 2)))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, name: str) -> dict:
        points = self.series[name]
        if len(points) < 2:
            return {}
        span = points[-1][0] - points[0][0]
        return {"rss_mb_first": points[0][1], "rss_mb_last": points[-1][1], "rss_mb_max": max(p[1] for p in points),
                "cpu_percent": round(100 * (points[-1][2] - points[0][2]) / span, 1) if span else None}


def cpu_per_job(sampler: Sampler, names: list[str], load: dict) -> dict:
    """CPU milliseconds per completed job while the load ran: each sampled process, and together."""
    jobs = sum(1 for _, _, status in load["samples"] if status == 200)
    used = {name: sampler.series[name][-1][2] - sampler.series[name][0][2]
            for name in names if len(sampler.series[name]) > 1}
    if not jobs or not used:
        return {}
    return {"cpu_ms_per_job": {name: round(1000 * seconds / jobs, 2) for name, seconds in used.items()}
            | {"together": round(1000 * sum(used.values()) / jobs, 2)}}


def pid_of(process: FerryProcess) -> int:
    """The id of a process the harness has started."""
    if process.pid is None:
        raise RuntimeError(f"python -m {process.module} was not started")
    return process.pid


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


FERRY_MODULES = ("api", "workers")  # Ferry's own processes, run with its shipped settings


@dataclass
class Stack:
    """The processes of one run, started on demand and stopped at the end."""

    settings: Settings
    workdir: Path
    processes: list[FerryProcess] = field(default_factory=list)

    def process(self, module: str, *args: str, **env: str) -> FerryProcess:
        """``python -m module``, not started; Ferry's own at the shipped log level (FerryProcess's
        default, WARNING, is the tests' choice), unless ``env`` says otherwise."""
        if module in FERRY_MODULES:
            env = {"FERRY_LOG_LEVEL": self.settings.log_level} | env
        return FerryProcess(module, self.settings, self.workdir / f"{module}-{len(self.processes)}", *args, **env)

    def start(self, module: str, *args: str, **env: str) -> FerryProcess:
        process = self.process(module, *args, **env).start()
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.terminate(30)

    async def close(self) -> None:
        """Stop the processes, then delete the run's topics: a broker that keeps every run's
        topics (14 topics of 8 partitions each) gets slower, and later figures noisier."""
        self.stop()
        admin = AIOKafkaAdminClient(**client_options(self.settings))
        await admin.start()
        try:
            prefixes = (f"{self.settings.topic_prefix}-", f"{self.settings.app_id}-")
            ours = [topic for topic in await admin.list_topics() if topic.startswith(prefixes)]
            if ours:
                await admin.delete_topics(ours)
        finally:
            await admin.close()

    async def wait_ready(self, url: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        # A process whose event loop is busy does not answer: each try gives up after a second.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(url) as reply:
                        if reply.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{url} not ready after {timeout} s")

    async def api(self) -> tuple[FerryProcess, str]:
        process = self.start("api")
        url = f"http://127.0.0.1:{self.settings.api_port}"
        await self.wait_ready(f"{url}/health/ready")
        return process, url

    async def worker(self, **env: str) -> FerryProcess:
        process = self.start("workers", **env)
        await self.wait_ready(f"http://127.0.0.1:{process.web_port}/health/ready")
        return process

    def fake_provider(self, port: int, latency: float) -> FerryProcess:
        return self.start("deploy.fakes.openai_server", "--port", str(port), "--latency", str(latency))


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def stack_settings(bootstrap: str, fake_port: int, **overrides) -> Settings:
    """A run's settings: topics of its own, replicated on every broker the bootstrap list names
    (one for the single broker, three on the cluster, as Ferry would be deployed on each)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    replicas = min(3, len(bootstrap.split(",")))
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap, "app_id": name, "topic_prefix": name, "api_port": free_port(),
        "topic_replication_factor": replicas,
        "providers": {"fake": {"base_url": f"http://127.0.0.1:{fake_port}/v1"}},
    }
    return Settings(**(values | overrides))


async def submit_many(url: str, count: int, concurrency: int = 64, model: str = "fake/gpt-4o-mini") -> list[str]:
    body = json.dumps({"model": model,
                       "messages": [{"role": "user", "content": "x" * 900}]}).encode()
    ids: list[str] = []
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(share: int) -> None:
            for _ in range(share):
                async with session.post("/v1/async/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as reply:
                    if reply.status == 202:
                        ids.append((await reply.json())["id"])
                    else:
                        await asyncio.sleep(0.1)  # 503 while Kafka is slow: the job was not queued

        await asyncio.gather(*(client(count // concurrency + (n < count % concurrency)) for n in range(concurrency)))
    return ids


async def wait_all_terminal(url: str, ids: list[str], timeout: float = 1800) -> None:
    """Poll the last-submitted jobs first; when they are done, sweep all of them once."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(url) as session:
        remaining = list(ids)
        while remaining:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(remaining)} jobs not terminal after {timeout} s")
            still = []
            for job_id in remaining[-200:]:
                async with session.get(f"/v1/async/chat/completions/{job_id}") as reply:
                    if reply.status == 202:
                        still.append(job_id)
            if still:
                await asyncio.sleep(0.5)
                continue
            for start in range(0, len(remaining), 500):
                batch = remaining[start:start + 500]
                statuses = await asyncio.gather(*(poll_status(session, job_id) for job_id in batch))
                still.extend(job_id for job_id, status in zip(batch, statuses, strict=True) if status == 202)
            remaining = still


async def poll_status(session: aiohttp.ClientSession, job_id: str) -> int:
    async with session.get(f"/v1/async/chat/completions/{job_id}") as reply:
        await reply.read()
        return reply.status


class RecordingFake:
    """``bench.recording_fake`` in its own process, and the harness's copy of its call log."""

    def __init__(self, stack: Stack, port: int, latency: float) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = stack.start("bench.recording_fake", "--port", str(port), "--latency", str(latency))
        self.calls: list[list] = []  # [marker, received_at, answered_at], as of the last refresh
        self.in_flight = 0

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Fetch the calls made since the last refresh (earlier ones keep their first answered_at)."""
        async with session.get(f"{self.url}/bench/calls", params={"since": len(self.calls)}) as reply:
            body = await reply.json()
        self.calls.extend(body["calls"])
        self.in_flight = body["in_flight"]

    async def final(self) -> list[list]:
        """The whole log, answers included."""
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/bench/calls") as reply:
            return (await reply.json())["calls"]


def marked_body(marker: str, padding: int) -> bytes:
    return json.dumps({"model": "fake/gpt-4o-mini",
                       "messages": [{"role": "user", "content": f"{marker} {'x' * padding}"}]}).encode()


async def post_job(session: aiohttp.ClientSession, body: bytes) -> tuple[int, str | None]:
    async with session.post(CHAT, data=body, headers={"Content-Type": "application/json"}) as reply:
        return reply.status, (await reply.json())["id"] if reply.status == 202 else None


def longest_gap(start: float, end: float, times: list[float]) -> tuple[float, float]:
    """The longest stretch in [start, end] without one of ``times``: (length, its start)."""
    points = [start, *sorted(t for t in times if start <= t <= end), end]
    length, at = max((b - a, a) for a, b in itertools.pairwise(points))
    return round(length, 3), round(at - start, 3)


def first_after(moment: float | None, times: list[float]) -> float | None:
    """Seconds from ``moment`` to the first of ``times`` at or after it; None if none, or no moment."""
    if moment is None:
        return None
    first = min((t for t in times if t >= moment), default=None)
    return round(first - moment, 3) if first is not None else None


def polls_per_job(load: dict) -> dict:
    """e2e: the GETs sent per job; a poll every 5 ms at first, so it rises with the latency, and
    with it the API's CPU per job."""
    if load.get("mode") != "e2e" or not load["samples"]:
        return {}
    return {"polls_per_job": round(load.get("polls", 0) / len(load["samples"]), 2)}


def latency_summary(load: dict, ok_status: int) -> dict:
    """A load's answers: counts by status, rate, percentiles of the ``ok_status`` ones, the generator's CPU."""
    samples = load["samples"]
    ok = [latency for _, latency, status in samples if status == ok_status]
    statuses: dict[str, int] = {}
    for _, _, status in samples:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    wall = load["wall_seconds"]
    return {"requests": len(samples), "ok": len(ok), "statuses": statuses, "per_second": round(len(ok) / wall, 1),
            "p50_ms": percentile(ok, 0.50), "p99_ms": percentile(ok, 0.99), "p999_ms": percentile(ok, 0.999),
            "mean_ms": round(statistics.fmean(ok), 2) if ok else None,
            "loadgen_cpu_percent": round(100 * load["cpu_seconds"] / wall, 1),
            "polls_sent_again": load.get("connection_errors", 0)} | polls_per_job(load)


def run_load(workdir: Path, mode: str, *args: str) -> dict:
    """``python -m bench.load mode args``, in a process of its own; what it wrote."""
    out = workdir / f"load-{mode}-{uuid.uuid4().hex[:6]}.json"
    subprocess.run([sys.executable, "-m", "bench.load", mode, "--out", str(out), *args], cwd=REPO_ROOT, check=True)
    return json.loads(out.read_text())
