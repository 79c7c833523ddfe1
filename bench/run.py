"""Ferry's benchmarks: the real local stack (Kafka, API, worker, fake provider), measured.

    python -m bench.run                          # every scenario, full size (`make bench`)
    python -m bench.run --scenarios submit,e2e   # some of them
    python -m bench.run --quick                  # tiny sizes: checks the harness, not the speed

Scenarios: ``submit`` (POST throughput of one API process, beside two ceilings: a bare aiohttp
handler and raw aiokafka sends with the API's durability settings), ``e2e`` (submit → terminal
through GET at fixed offered rates, zero-latency provider), ``floor`` (a job's Kafka trips alone,
without Ferry, at the e2e rates: their latency and CPU, the floor under e2e's figures;
``bench/kafka_floor.py``), ``inflight`` (provider latency 2 s, one worker), ``backlog`` (jobs
queued before the worker starts: drain rate, worker RSS over time), ``poll`` (GETs on the table
the backlog left, API RSS per 100,000 jobs), ``rebalance`` (steady load while a second worker
joins, then leaves on SIGTERM: the longest stretch without completions, lost jobs, provider
calls made twice), ``resume`` (a worker SIGKILLed with every job's call in flight: how soon its
replacement has started each one again, and its CPU),
``mixed`` (a provider throttled to 60 calls a minute with a deep backlog beside one at full speed:
the fast one's figures alone and beside it; ``bench/mixed.py``),
and two on the local three-node cluster: ``failover`` (a leader node SIGKILLed, a follower
SIGKILLed, a rolling restart with SIGTERM, each under steady load: 503s, submit latency, lost
jobs; ``bench/cluster_faults.py``) and ``scale`` (completed jobs/s and CPU per job of each
process kind with 1, 2 and 3 workers; ``bench/scale.py``). Only when named: ``compare`` (the
same loads on Ferry and on another implementation of the async API: ``--compare-url``;
``bench/compare.py``).

Each run writes ``results.json`` and ``chart.png`` under ``bench/results/<UTC time>/``. The load
generator (``bench/load.py``) runs in its own process and reports its own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from app.settings import Settings
from app.topics import declare_topics, partition_for
from bench.cluster_faults import KINDS as FAULT_KINDS
from bench.cluster_faults import BrokerFault, scenario_failover
from bench.compare import DEFAULT_FAKE_PORT, Compare, scenario_compare
from bench.load import CHAT, header
from bench.mixed import Mixed, scenario_mixed
from bench.scale import Scale, scenario_scale
from bench.stack import (
    RecordingFake,
    Sampler,
    Stack,
    cpu_per_job,
    first_after,
    latency_summary,
    longest_gap,
    marked_body,
    percentile,
    pid_of,
    post_job,
    run_load,
    stack_settings,
    submit_many,
    wait_all_terminal,
    wait_port,
)
from deploy.kafka.broker import LocalKafka
from deploy.kafka.cluster import LocalKafkaCluster
from deploy.kafka.locate import locate
from deploy.processes import REPO_ROOT, FerryProcess, free_port

SCENARIOS = ("submit", "e2e", "floor", "inflight", "backlog", "poll", "rebalance", "resume", "mixed", "failover",
             "scale")
# Run only when named (they need something from the user): ``compare`` another gateway's URL.
ON_REQUEST = ("compare",)
# These run on the local three-node cluster (started for them when it does not run), the rest on one broker.
CLUSTER_SCENARIOS = ("failover", "scale")


@dataclass
class Sizes:
    seconds: float = 15
    concurrency: int = 64
    rates: tuple[int, ...] = (200, 1000)
    inflight_rate: int = 1000
    backlog_jobs: int = 100_000
    warmup_rate: int = 200  # the end-to-end scenarios' load before the measured one
    # Long enough for a freshly started broker's JIT to settle (6,000 jobs): with 3 s, the
    # measured load met the broker still compiling, and the tail at 200 jobs/s was mostly that
    # (docs/benchmarks.md). The warm-up's own figures are kept beside the measured ones.
    warmup_seconds: float = 30
    # The load offered to a fresh worker that replaces the warmed one (the first-second target).
    restart_seconds: float = 5
    rebalance_rate: int = 50
    rebalance_seconds: float = 40  # a worker joins at a quarter of it and leaves at five eighths
    resume_jobs: int = 10_000
    failover_rate: int = 100
    failover_seconds: float = 40
    failover_kinds: tuple[str, ...] = FAULT_KINDS
    scale_rate: int = 400
    scale_seconds: float = 25
    mixed: Mixed = field(default_factory=Mixed)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(seconds=2, concurrency=8, rates=(50,), inflight_rate=50, backlog_jobs=300, warmup_rate=50,
                   warmup_seconds=1, restart_seconds=1, rebalance_rate=20, rebalance_seconds=24, resume_jobs=200,
                   failover_rate=20, failover_seconds=10, failover_kinds=("leader",), scale_rate=50,
                   scale_seconds=8, mixed=Mixed(backlog=20, rate=20, seconds=2, max_wait=20))


# The in-flight scenario's target is 2,000 calls at once: its worker may hold twice that. The
# others run the worker as shipped (worker_max_in_flight's default).
INFLIGHT_MAX_IN_FLIGHT = 4000




async def worker_in_flight(worker: FerryProcess) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{worker.web_port}/health") as reply:
            return (await reply.json())["in_flight"]


def scenario_floor(bootstrap: str, workdir: Path, sizes: Sizes, broker_pid: int | None) -> dict:
    """The Kafka trips of a job without Ferry, at each e2e rate, in a process of their own."""
    results = {}
    for rate in sizes.rates:
        out = workdir / f"floor-{rate}.json"
        subprocess.run([sys.executable, "-m", "bench.kafka_floor", "--bootstrap", bootstrap, "--rate", str(rate),
                        "--seconds", str(sizes.seconds), "--warmup-seconds", str(min(5.0, sizes.seconds)),
                        "--out", str(out), *(("--broker-pid", str(broker_pid)) if broker_pid else ())],
                       cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        results[f"rate_{rate}"] = json.loads(out.read_text())
    return results


async def scenario_submit(bootstrap: str, workdir: Path, sizes: Sizes) -> dict:
    common = ("--seconds", str(sizes.seconds), "--concurrency", str(sizes.concurrency))
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_server", "--port", str(bare_port)], cwd=REPO_ROOT)
    try:
        await wait_port(bare_port)
        bare_load = run_load(workdir, "submit", "--url", f"http://127.0.0.1:{bare_port}", *common)
    finally:
        bare.terminate()
        bare.wait()
    settings = stack_settings(bootstrap, free_port())
    await declare_topics(settings)
    kafka_load = run_load(workdir, "kafka", "--bootstrap", bootstrap, "--topic",
                          f"{settings.topic_prefix}-requests-chat_completion", *common)
    stack = Stack(settings, workdir)
    try:
        api, url = await stack.api()  # no worker: submits are the API's work alone
        with Sampler({"api": pid_of(api)}) as sampler:
            ferry_load = run_load(workdir, "submit", "--url", url, *common)
    finally:
        await stack.close()
    ferry, bare_s, kafka_s = (latency_summary(load, 202) for load in (ferry_load, bare_load, kafka_load))
    return {"ferry": ferry | {"api": sampler.summary("api")}, "ceiling_bare_aiohttp": bare_s,
            "ceiling_raw_aiokafka": kafka_s,
            "ratio_to_bare": round(ferry["per_second"] / bare_s["per_second"], 3) if bare_s["per_second"] else None,
            "ratio_to_kafka": round(ferry["per_second"] / kafka_s["per_second"], 3) if kafka_s["per_second"] else None,
            "_loads": {"ferry": ferry_load}}


async def scenario_e2e(bootstrap: str, workdir: Path, sizes: Sizes, latency: float = 0.0,
                       rates: tuple[int, ...] | None = None, broker_pid: int | None = None,
                       restart_worker: bool = False, **worker_settings) -> dict:
    fake_port = free_port()
    stack = Stack(stack_settings(bootstrap, fake_port, **worker_settings), workdir)
    results: dict = {"provider_latency_s": latency}
    if worker_settings:
        results["settings_changed"] = worker_settings  # from the shipped defaults, for this scenario
    try:
        stack.fake_provider(fake_port, latency)
        api, url = await stack.api()
        worker = await stack.worker()
        # Warm up: a fresh worker's stream drops the first records it fetches (the catch-up takes
        # them seconds later), and its first seconds under load open the provider connections;
        # measure the steady state. The warm-up's own figures are kept beside the others.
        await wait_all_terminal(url, await submit_many(url, 50, concurrency=10))
        warmup = await asyncio.to_thread(run_load, workdir, "e2e", "--url", url, "--rate", str(sizes.warmup_rate),
                                         "--seconds", str(sizes.warmup_seconds))
        results["warmup"] = latency_summary(warmup, 200) | {"offered_per_second": sizes.warmup_rate,
                                                              "first_second": first_second(warmup)}
        # Issue 16's first-second target is for a worker that starts beside a running broker. The
        # warm-up's first second above also meets a broker the run may have just started (its JIT
        # still compiling), so a fresh worker replaces the warmed one, and the warm-up's load
        # starts as soon as the new one answers ready: no jobs of its own before.
        if restart_worker:
            await asyncio.to_thread(worker.terminate, 30)
            worker = await stack.worker()
            restarted = await asyncio.to_thread(run_load, workdir, "e2e", "--url", url, "--rate",
                                                str(sizes.warmup_rate), "--seconds", str(sizes.restart_seconds))
            results["worker_restarted"] = latency_summary(restarted, 200) | {
                "offered_per_second": sizes.warmup_rate, "first_second": first_second(restarted)}
        for rate in rates or sizes.rates:
            peak = 0
            sampled = {"api": pid_of(api), "worker": pid_of(worker)} | ({"broker": broker_pid} if broker_pid else {})
            with Sampler(sampled) as sampler:
                load = asyncio.create_task(asyncio.to_thread(
                    run_load, workdir, "e2e", "--url", url, "--rate", str(rate), "--seconds", str(sizes.seconds)))
                while not load.done():
                    peak = max(peak, await worker_in_flight(worker))
                    await asyncio.sleep(0.25)
                loaded = await load
            measured = latency_summary(loaded, 200) | {"offered_per_second": rate, "peak_in_flight": peak} | {
                name: sampler.summary(name) for name in sampled} | cpu_per_job(sampler, list(sampled), loaded)
            if "api" in measured.get("cpu_ms_per_job", {}) and "polls_per_job" in measured:
                # Per HTTP request (the submit and its polls): the API's cost apart from the latency.
                per_request = measured["cpu_ms_per_job"]["api"] / (1 + measured["polls_per_job"])
                measured["api_cpu_ms_per_request"] = round(per_request, 3)
            results[f"rate_{rate}"] = measured
            results.setdefault("_loads", {})[f"rate_{rate}"] = loaded
    finally:
        await stack.close()
    return results


def cpu_per_answer(sampler: Sampler, name: str, load: dict) -> float | None:
    """A process's CPU milliseconds per 200 the load received (the poll scenario: per poll)."""
    answered = sum(1 for _, _, status in load["samples"] if status == 200)
    points = sampler.series[name]
    if not answered or len(points) < 2:
        return None
    return round(1000 * (points[-1][2] - points[0][2]) / answered, 3)


def first_second(load: dict) -> dict:
    """The jobs submitted in a load's first second (issue 16's target for a worker that has just
    started: p50 of 50 ms): how many, and their p50 and p99 to a 200."""
    ok = [latency for started, latency, status in load["samples"] if started < 1.0 and status == 200]
    return {"jobs": len(ok), "p50_ms": percentile(ok, 0.50), "p99_ms": percentile(ok, 0.99)}


async def scenario_backlog_and_poll(bootstrap: str, workdir: Path, sizes: Sizes, run_poll: bool) -> dict:
    fake_port = free_port()
    stack = Stack(stack_settings(bootstrap, fake_port), workdir)
    results: dict = {}
    try:
        stack.fake_provider(fake_port, 0.0)
        api, url = await stack.api()
        api_rss_empty = Sampler.read(pid_of(api))[0]
        ids = await submit_many(url, sizes.backlog_jobs)
        ids_file = workdir / "backlog-ids.json"
        ids_file.write_text(json.dumps(ids))
        began = time.monotonic()
        worker = stack.start("workers")
        with Sampler({"worker": pid_of(worker), "api": pid_of(api)}, interval=1.0) as sampler:
            # The target is flat memory "from the first to the last job": the RSS when the first
            # job is done (the worker is up and working), then when the last one is.
            await wait_all_terminal(url, ids[:1])
            rss_at_first = Sampler.read(pid_of(worker))[0]
            await wait_all_terminal(url, ids)
            rss_at_last = Sampler.read(pid_of(worker))[0]
        drained_in = time.monotonic() - began
        worker_series = sampler.series["worker"]
        results["backlog"] = {"jobs": len(ids), "seconds_from_worker_start": round(drained_in, 1),
                              "drain_per_second": round(len(ids) / drained_in, 1),
                              "worker_rss_mb_at_first_job": round(rss_at_first, 1),
                              "worker_rss_mb_at_last_job": round(rss_at_last, 1),
                              "worker_rss_growth_percent": round(100 * (rss_at_last / rss_at_first - 1), 1),
                              "worker": sampler.summary("worker"), "worker_rss_series": worker_series}
        if run_poll:
            api_rss = Sampler.read(pid_of(api))[0]
            with Sampler({"api": pid_of(api)}) as poll_sampler:
                load = run_load(workdir, "poll", "--url", url, "--ids-file", str(ids_file),
                                "--seconds", str(sizes.seconds), "--concurrency", str(sizes.concurrency))
            results["poll"] = latency_summary(load, 200) | {
                "api": poll_sampler.summary("api"), "api_cpu_ms_per_poll": cpu_per_answer(poll_sampler, "api", load),
                "jobs_in_table": len(ids), "api_rss_mb": round(api_rss, 1), "api_rss_mb_empty": round(api_rss_empty, 1),
                # What the jobs cost, not the process's baseline.
                "api_rss_mb_per_100k_jobs": round((api_rss - api_rss_empty) * 100_000 / len(ids), 1)}
            results.setdefault("_loads", {})["poll"] = load
    finally:
        await stack.close()
    return results








# -- rebalance and resume -----------------------------------------------------------------------

@dataclass
class Rebalance:
    """The rebalance scenario's plan: steady load, a worker joining, then leaving on SIGTERM."""

    rate: int = 50
    seconds: float = 40
    join_at: float = 10
    leave_at: float = 25
    provider_latency: float = 0.05

    @classmethod
    def for_sizes(cls, sizes: Sizes) -> Rebalance:
        seconds = sizes.rebalance_seconds
        return cls(rate=sizes.rebalance_rate, seconds=seconds, join_at=seconds / 4, leave_at=seconds * 5 / 8)


@dataclass
class Resume:
    """The resume scenario's plan: this many calls in flight when their worker is SIGKILLed."""

    jobs: int = 10_000
    provider_latency: float = 600












# Worker log lines worth a reader's eye: problems, and Faust's note that the event loop was blocked.
FLAGGED = ("WARNING", "ERROR", "CRITICAL", "Traceback", "woke up too late")


async def worker_pages(worker: FerryProcess) -> dict:
    """The worker's ``/health`` counters and its ``/metrics`` lines on jobs in flight and consumer lag."""
    base = f"http://127.0.0.1:{worker.web_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"{base}/health") as reply:
                health = await reply.json()
            async with session.get(f"{base}/metrics") as reply:
                metrics = [line for line in (await reply.text()).splitlines()
                           if not line.startswith("#") and ("lag" in line or "in_flight" in line)]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"error": type(exc).__name__}
    return {"health": health, "metrics": metrics}


def worker_log_lines(process: FerryProcess) -> list[str]:
    path = process.workdir / f"{process.module}.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def worker_log_excerpt(process: FerryProcess, limit: int = 20) -> dict:
    """The worker log's flagged lines (``FLAGGED``): how many, and the first of them."""
    lines = worker_log_lines(process)
    flagged = [line for line in lines if any(word in line for word in FLAGGED)]
    return {"log": str(process.workdir / f"{process.module}.log"), "lines": len(lines), "flagged": len(flagged),
            "first_flagged": flagged[:limit]}


def assignments(process: FerryProcess, clock_offset: float) -> list[float]:
    """When the worker's consumer took each new assignment, from its INFO log, in ``time.monotonic()``
    seconds (``clock_offset``: ``time.time() - time.monotonic()``, the log's times being wall times)."""
    times = []
    for line in worker_log_lines(process):
        if "Setting newly assigned partitions" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone()
            times.append(stamp.timestamp() - clock_offset)
    return times


async def scenario_rebalance(bootstrap: str, workdir: Path, plan: Rebalance) -> dict:
    """Steady load through a clean join and a clean leave: gaps in service, lost and repeated calls."""
    fake_port = free_port()
    settings = stack_settings(bootstrap, fake_port)
    stack = Stack(settings, workdir / "rebalance")
    jobs: dict[str, dict] = {}  # marker -> id, submitted, terminal (monotonic), status
    events: dict[str, float] = {}
    poll_rounds: list[float] = []
    try:
        fake = RecordingFake(stack, fake_port, plan.provider_latency)
        await wait_port(fake_port)
        api, url = await stack.api()
        first = await stack.worker(FERRY_LOG_LEVEL="INFO")  # INFO: the log's assignment lines are read
        await wait_all_terminal(url, await submit_many(url, 50, concurrency=10))  # warm-up, see scenario_e2e
        second = FerryProcess("workers", settings, stack.workdir / "workers-joining", FERRY_LOG_LEVEL="INFO")
        outstanding: dict[str, str] = {}  # id -> marker
        submitting = True
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=64)) as session:
            began = time.monotonic()

            async def submit(number: int) -> None:
                marker = f"job-{number}"
                sent = time.monotonic()
                status, job_id = await post_job(session, marked_body(marker, 200))
                jobs[marker] = {"id": job_id, "submitted": sent, "submit_status": status, "terminal": None}
                if job_id:
                    outstanding[job_id] = marker

            async def poll_one(job_id: str) -> None:
                try:
                    async with session.get(f"{CHAT}/{job_id}") as reply:
                        status, body = reply.status, await reply.json()
                except (aiohttp.ClientError, ValueError):
                    return  # the API busy or restarting: polled again next round
                job = jobs[outstanding[job_id]]
                job["status"] = body.get("status")  # the last one seen: a lost job's tells where it stuck
                if status == 200:
                    job["terminal"] = time.monotonic()
                    del outstanding[job_id]

            async def poll() -> None:
                # Rounds over every unfinished job: a round's length is the precision of a
                # terminal time, and it grows with the jobs waiting instead of flooding the API.
                drain_deadline = began + plan.seconds + 90
                while (submitting or outstanding) and time.monotonic() < drain_deadline:
                    round_began = time.monotonic()
                    await asyncio.gather(*(poll_one(job_id) for job_id in list(outstanding)))
                    poll_rounds.append(time.monotonic() - round_began)
                    await asyncio.sleep(0.02)

            async def churn() -> None:
                await asyncio.sleep(max(0.0, began + plan.join_at - time.monotonic()))
                events["join"] = time.monotonic()
                second.start()
                stack.processes.append(second)
                try:
                    await stack.wait_ready(f"http://127.0.0.1:{second.web_port}/health/ready",
                                           timeout=plan.leave_at - plan.join_at)
                    events["joined_ready"] = time.monotonic()
                except RuntimeError:
                    pass  # not ready before its SIGTERM: reported as such
                await asyncio.sleep(max(0.0, began + plan.leave_at - time.monotonic()))
                events["leave"] = time.monotonic()
                await asyncio.to_thread(second.terminate, 120)  # SIGTERM, then its exit
                events["left_exited"] = time.monotonic()

            poller = asyncio.create_task(poll())
            churner = asyncio.create_task(churn())
            submits = []
            for number in range(int(plan.rate * plan.seconds)):
                delay = began + number / plan.rate - time.monotonic()  # open loop, as bench.load e2e
                if delay > 0:
                    await asyncio.sleep(delay)
                submits.append(asyncio.create_task(submit(number)))
            await asyncio.gather(*submits)
            submitting = False
            await churner
            await poller
        after_drain = await worker_pages(first)  # jobs still unfinished: what the worker says of them
        calls = await fake.final()
        logs = {"first": worker_log_excerpt(first), "joining": worker_log_excerpt(second)}
        clock_offset = time.time() - time.monotonic()
        assigned_at = {"first": [t for t in assignments(first, clock_offset) if t > began],
                       "joining": assignments(second, clock_offset)}
        assigned = {name: [round(t - began, 2) for t in times] for name, times in assigned_at.items()}
    finally:
        await stack.close()

    ours = [call for call in calls if call[0] and call[0].startswith("job-")]
    calls_per_job = Counter(call[0] for call in ours)
    partitions = settings.topic_partitions
    partition_of = {marker: partition_for(job["id"], partitions) for marker, job in jobs.items() if job["id"]}
    completions = [job["terminal"] for job in jobs.values() if job["terminal"]]
    starts = [call[1] for call in ours]
    call_times = {p: [call[1] for call in ours if partition_of.get(call[0]) == p] for p in range(partitions)}
    end = began + plan.seconds

    def around(event: str, until: float) -> dict:
        at = events[event]
        gap, gap_at = longest_gap(at, until, completions)
        call_gap, call_gap_at = longest_gap(at, until, starts)
        per_partition = {p: longest_gap(at, until, times)[0] for p, times in call_times.items()}
        latencies = [job["terminal"] - job["submitted"] for job in jobs.values()
                     if job["terminal"] and at - 1 <= job["submitted"] <= until]
        # The rebalance the event caused: the first assignment either worker took after it.
        rebalanced = min((t for times in assigned_at.values() for t in times if at < t <= until), default=None)
        first_calls = {p: first_after(rebalanced, times) for p, times in call_times.items()}
        return {"at_s": round(at - began, 2), "window_s": round(until - at, 2),
                "assigned_s_after": round(rebalanced - at, 2) if rebalanced is not None else None,
                # Per partition: its first provider call after that assignment (a partition takes
                # ~rate/partitions jobs a second, so even a partition that never stalled waits a
                # fraction of a second for its next job).
                "first_call_per_partition_s_after_assignment": first_calls,
                "longest_gap_in_completions_s": gap, "gap_began_s_after": gap_at,
                "longest_gap_in_provider_calls_s": call_gap, "call_gap_began_s_after": call_gap_at,
                "longest_gap_per_partition_s": per_partition,
                "submit_to_terminal_max_s": round(max(latencies), 3) if latencies else None,
                "submit_to_terminal_p99_s": percentile(latencies, 0.99)}

    quiet_from = began + 1
    baseline = {p: longest_gap(quiet_from, events["join"], times)[0] for p, times in call_times.items()}
    submitted = [job for job in jobs.values() if job["id"]]
    statuses = Counter(job["status"] for job in submitted if job["terminal"])
    lost = [(marker, job) for marker, job in jobs.items() if job["id"] and not job["terminal"]]
    (stack.workdir / "jobs.json").write_text(json.dumps({"began": began, "events": events, "jobs": jobs,
                                                         "calls": calls}))
    return {
        "plan": plan.__dict__, "partitions": partitions,
        "join": around("join", min(events["leave"], end)) | {
            "joiner_ready_s_after_start": round(events["joined_ready"] - events["join"], 2)
            if "joined_ready" in events else None},
        "leave": around("leave", max(events["leave"], end)) | {
            "leaver_exited_s_after_sigterm": round(events["left_exited"] - events["leave"], 2)},
        "baseline_before_join": {"window_s": round(events["join"] - quiet_from, 2),
                                 "longest_gap_per_partition_s": baseline,
                                 "longest_gap_in_completions_s":
                                     longest_gap(quiet_from, events["join"], completions)[0]},
        "assignments_s_after_load_start": assigned,
        "jobs_submitted": len(submitted), "submits_refused": len(jobs) - len(submitted),
        "jobs_completed": statuses.get("completed", 0), "jobs_failed": statuses.get("failed", 0),
        "jobs_lost": len(lost),  # not terminal 90 s after the load
        "lost_jobs_by_last_status": dict(Counter(job["status"] for _, job in lost)),
        "lost_jobs_by_partition": dict(Counter(partition_of[marker] for marker, _ in lost)),
        "lost_jobs_submitted_s": [round(min(job["submitted"] for _, job in lost) - began, 2),
                                  round(max(job["submitted"] for _, job in lost) - began, 2)] if lost else None,
        "jobs_never_called": sum(1 for marker in jobs if jobs[marker]["id"] and marker not in calls_per_job),
        "duplicate_provider_calls": sum(n - 1 for n in calls_per_job.values() if n > 1),
        "jobs_called_more_than_once": sum(1 for n in calls_per_job.values() if n > 1),
        "poll_round_max_s": round(max(poll_rounds), 3) if poll_rounds else None,
        "poll_round_p50_s": percentile(poll_rounds, 0.5),
        "first_worker_after_drain": after_drain,
        "worker_logs": logs,
    }


async def scenario_resume(bootstrap: str, workdir: Path, plan: Resume) -> dict:
    """Jobs orphaned by a SIGKILLed worker: how soon its replacement has started each one again."""
    fake_port = free_port()
    # Every job's call must be in flight at once: the in-flight cap and the connection pool are
    # raised to the job count; calls outlast the run, and the provider timeout outlasts the calls.
    defaults = Settings.model_fields
    settings = stack_settings(bootstrap, fake_port,
                              worker_max_in_flight=max(plan.jobs, defaults["worker_max_in_flight"].default),
                              http_max_connections=max(plan.jobs, defaults["http_max_connections"].default),
                              provider_timeout_seconds=plan.provider_latency + 300)
    stack = Stack(settings, workdir / "resume")
    results: dict = {"plan": plan.__dict__, "settings_changed": {
        "worker_max_in_flight": settings.worker_max_in_flight, "http_max_connections": settings.http_max_connections,
        "provider_timeout_seconds": settings.provider_timeout_seconds}}
    try:
        fake = RecordingFake(stack, fake_port, plan.provider_latency)
        await wait_port(fake_port)
        _, url = await stack.api()
        first = await stack.worker()
        await submit_marked(url, plan.jobs)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 600
            while fake.in_flight < plan.jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {fake.in_flight} calls in flight after 600 s")
                await asyncio.sleep(0.5)
                await fake.refresh(session)
            # The jobs' processing records and the request commits reach Kafka within a commit interval.
            await asyncio.sleep(5)
            first.kill()
            killed = time.monotonic()
            results["calls_before_kill"] = len(fake.calls)
            second = stack.start("workers", FERRY_LOG_LEVEL="INFO")  # INFO: its assignment is read from the log
            ready = None
            seen: Counter = Counter(call[0] for call in fake.calls)
            restarted_at: dict[str, float] = {}
            cpu: list[tuple[float, float]] = []  # (monotonic, the replacement's CPU seconds)
            deadline = time.monotonic() + 600
            while len(restarted_at) < plan.jobs and time.monotonic() < deadline:
                cpu.append((time.monotonic(), Sampler.read(pid_of(second))[1]))
                if ready is None:
                    try:
                        async with session.get(f"http://127.0.0.1:{second.web_port}/health/ready",
                                               timeout=aiohttp.ClientTimeout(total=0.2)) as reply:
                            ready = time.monotonic() if reply.status == 200 else None
                    except (aiohttp.ClientError, TimeoutError):
                        pass  # not listening yet, or its event loop is busy
                before = len(fake.calls)
                await fake.refresh(session)
                for marker, received, _ in fake.calls[before:]:
                    seen[marker] += 1
                    if seen[marker] == 2:
                        restarted_at[marker] = received
                await asyncio.sleep(0.05)
            cpu.append((time.monotonic(), Sampler.read(pid_of(second))[1]))
            second.kill()  # its calls would drain for the grace period
        clock_offset = time.time() - time.monotonic()
        restarts = sorted(restarted_at.values())
        # The assignment the orphans were resumed under: the last one before the first restart.
        taken = [t for t in assignments(second, clock_offset) if not restarts or t <= restarts[0]]
        assigned = taken[-1] if taken else None

        def cpu_at(moment: float) -> float:
            return next((seconds for at, seconds in reversed(cpu) if at <= moment), cpu[0][1])

        def after(moment: float | None, then: float | None) -> float | None:
            return round(then - moment, 3) if moment is not None and then is not None else None

        results |= {
            "jobs": plan.jobs, "jobs_started_again": len(restarts),
            "assigned_s_after_kill": after(killed, assigned),
            "ready_s_after_kill": after(killed, ready),
            "first_restart_s_after_assignment": after(assigned, restarts[0] if restarts else None),
            "all_restarted_s_after_assignment": after(assigned, restarts[-1] if restarts else None),
            "all_restarted_s_after_ready": after(ready, restarts[-1] if restarts else None),
            "all_restarted_s_after_kill": after(killed, restarts[-1] if restarts else None),
            "restarts_per_second": round(len(restarts) / (restarts[-1] - restarts[0]), 1)
            if len(restarts) > 1 and restarts[-1] > restarts[0] else None,
            "replacement_cpu_s_assignment_to_all_restarted":
                round(cpu_at(restarts[-1]) - cpu_at(assigned), 2) if assigned and restarts else None,
            "replacement_cpu_s_since_its_start": round(cpu[-1][1], 2),
            "worker_logs": {"killed": worker_log_excerpt(first), "replacement": worker_log_excerpt(second)}}
    finally:
        await stack.close()
    return results


async def submit_marked(url: str, count: int, concurrency: int = 64) -> dict[str, str]:
    """Submit ``count`` small chat jobs whose message starts with their marker; marker -> id."""
    ids: dict[str, str] = {}
    queue = iter(range(count))
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client() -> None:
            for number in queue:
                marker = f"job-{number}"
                while marker not in ids:
                    status, job_id = await post_job(session, marked_body(marker, 20))
                    if job_id:
                        ids[marker] = job_id
                    else:
                        await asyncio.sleep(0.1)  # 503 while Kafka is slow: not queued, sent again

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = {f"{scenario}:{name}": load for scenario, body in results["scenarios"].items()
             for name, load in body.get("_loads", {}).items()}
    rss = results["scenarios"].get("backlog", {}).get("backlog", {}).get("worker_rss_series")
    figure, axes = plt.subplots(1, 3, figsize=(18, 5))
    for name, load in loads.items():
        latencies = sorted(latency for _, latency, _ in load["samples"])
        if latencies:
            axes[0].plot([100 * i / len(latencies) for i in range(len(latencies))], latencies, label=name)
        seconds: dict[int, int] = {}
        for started, latency, _ in load["samples"]:
            second = int(started + latency / 1000)
            seconds[second] = seconds.get(second, 0) + 1
        axes[1].plot(sorted(seconds), [seconds[s] for s in sorted(seconds)], label=name)
    axes[0].set(title="latency distribution", xlabel="percentile", ylabel="ms", yscale="log")
    axes[1].set(title="throughput over time", xlabel="s", ylabel="answers per second")
    if rss:
        axes[2].plot([point[0] for point in rss], [point[1] for point in rss])
    axes[2].set(title="worker RSS while draining the backlog", xlabel="s", ylabel="MB")
    for axis in axes[:2]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def machine() -> dict:
    with open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    import aiokafka
    import faust

    return {"cores": os.cpu_count(), "memory_gib": round(total_kb / 1024 ** 2, 1), "python": platform.python_version(),
            "kernel": platform.release(), "faust_streaming": faust.__version__, "aiokafka": aiokafka.__version__,
            "aiohttp": aiohttp.__version__, "kafka": "4.1.1 (local KRaft: one node; failover and scale on three)"}


async def run(scenarios: list[str], sizes: Sizes, out_root: Path, on_cluster: bool = False,
              compare: Compare | None = None) -> Path:
    handle = locate(Settings())
    # The broker's CPU is part of Ferry's cost per job; known for the local broker only.
    broker_pid = LocalKafka(port=Settings().local_kafka_port).running_pid() if handle.source == "local" else None
    cluster = LocalKafkaCluster(port=Settings().local_kafka_cluster_port)
    cluster_was_running = any(pid is not None for pid in cluster.running().values())
    # The one-broker scenarios on the cluster instead (--on-cluster): the same figures with three
    # replicas of every topic.
    bootstrap = await asyncio.to_thread(cluster.start) if on_cluster else handle.bootstrap_servers
    workdir = out_root / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir.mkdir(parents=True)
    results: dict = {"machine": machine(), "sizes": asdict(sizes),
                     "kafka": "three-node cluster" if on_cluster else "one broker", "scenarios": {}}
    try:
        for scenario in scenarios:
            print(f"bench: {scenario} ...", flush=True)
            if scenario == "submit":
                results["scenarios"]["submit"] = await scenario_submit(bootstrap, workdir, sizes)
            elif scenario == "e2e":
                results["scenarios"]["e2e"] = await scenario_e2e(bootstrap, workdir, sizes, restart_worker=True,
                                                                 broker_pid=None if on_cluster else broker_pid)
            elif scenario == "floor":
                results["scenarios"]["floor"] = scenario_floor(bootstrap, workdir, sizes,
                                                               broker_pid=None if on_cluster else broker_pid)
            elif scenario == "inflight":
                results["scenarios"]["inflight"] = await scenario_e2e(bootstrap, workdir, sizes,
                                                                      latency=2.0, rates=(sizes.inflight_rate,),
                                                                      worker_max_in_flight=INFLIGHT_MAX_IN_FLIGHT)
            elif scenario == "backlog":
                results["scenarios"]["backlog"] = await scenario_backlog_and_poll(
                    bootstrap, workdir, sizes, run_poll="poll" in scenarios)
            elif scenario == "rebalance":
                results["scenarios"]["rebalance"] = await scenario_rebalance(bootstrap, workdir,
                                                                             Rebalance.for_sizes(sizes))
            elif scenario == "resume":
                results["scenarios"]["resume"] = await scenario_resume(bootstrap, workdir,
                                                                       Resume(jobs=sizes.resume_jobs))
            elif scenario == "failover":
                results["scenarios"]["failover"] = await scenario_failover(
                    cluster, workdir, BrokerFault(rate=sizes.failover_rate, seconds=sizes.failover_seconds),
                    sizes.failover_kinds)
            elif scenario == "scale":
                results["scenarios"]["scale"] = await scenario_scale(
                    cluster, workdir, Scale(rate=sizes.scale_rate, seconds=sizes.scale_seconds))
            elif scenario == "mixed":
                results["scenarios"]["mixed"] = await scenario_mixed(bootstrap, workdir, sizes.mixed)
            elif scenario == "compare" and compare is not None:
                results["scenarios"]["compare"] = await scenario_compare(bootstrap, workdir, sizes, compare)
    finally:
        handle.release()
        if not cluster_was_running and (on_cluster or set(scenarios) & set(CLUSTER_SCENARIOS)):
            await asyncio.to_thread(cluster.stop)
    chart(results, workdir / "chart.png")
    for body in results["scenarios"].values():
        body.pop("_loads", None)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({name: {k: v for k, v in body.items() if k != "backlog" or not isinstance(v, dict)}
                      for name, body in results["scenarios"].items()}, indent=1, default=str)[:6000])
    print(f"bench: results in {workdir}")
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the speed")
    parser.add_argument("--seconds", type=float, help="length of each timed load")
    parser.add_argument("--rates", help="offered rates of the e2e scenario, comma-separated (jobs/s)")
    parser.add_argument("--backlog-jobs", type=int, help="jobs queued before the worker starts")
    parser.add_argument("--rebalance-seconds", type=float,
                        help="length of the rebalance scenario's load (a worker joins at 1/4, leaves at 5/8)")
    parser.add_argument("--resume-jobs", type=int, help="calls in flight when the resume scenario's worker is killed")
    parser.add_argument("--failover-seconds", type=float, help="least length of each failover run's load")
    parser.add_argument("--scale-rate", type=int, help="offered rate of the scale scenario (jobs/s)")
    parser.add_argument("--on-cluster", action="store_true",
                        help="run every scenario on the local three-node cluster (topics at three replicas)")
    parser.add_argument("--compare-url", help="compare: the other implementation's base URL")
    parser.add_argument("--compare-model", default="fake/gpt-4o-mini",
                        help="compare: the model the other routes to the fake provider")
    parser.add_argument("--compare-header", type=header, action="append", default=[],
                        help='compare: "Name: value" sent to the other with every request (repeatable)')
    parser.add_argument("--compare-pid", type=int, help="compare: the other's process id, for its CPU")
    parser.add_argument("--fake-port", type=int, default=DEFAULT_FAKE_PORT,
                        help="compare: the fake provider's port (the other's OpenAI base URL: http://127.0.0.1:PORT/v1)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = parser.parse_args()
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(scenarios) - set(SCENARIOS) - set(ON_REQUEST)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}; choose from {SCENARIOS + ON_REQUEST}")
    if ("compare" in scenarios) != bool(args.compare_url):
        parser.error("--compare-url and the compare scenario go together")
    compare = Compare(args.compare_url, args.compare_model, args.compare_header, args.fake_port,
                      args.compare_pid) if args.compare_url else None
    if "poll" in scenarios and "backlog" not in scenarios:
        scenarios.append("backlog")  # poll reads the table the backlog leaves
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.seconds:
        sizes.seconds = args.seconds
    if args.rates:
        sizes.rates = tuple(int(rate) for rate in args.rates.split(","))
    if args.backlog_jobs:
        sizes.backlog_jobs = args.backlog_jobs
    if args.rebalance_seconds:
        sizes.rebalance_seconds = args.rebalance_seconds
    if args.resume_jobs:
        sizes.resume_jobs = args.resume_jobs
    if args.failover_seconds:
        sizes.failover_seconds = args.failover_seconds
    if args.scale_rate:
        sizes.scale_rate = args.scale_rate
    asyncio.run(run(scenarios, sizes, Path(args.out), args.on_cluster, compare))


if __name__ == "__main__":
    main()
