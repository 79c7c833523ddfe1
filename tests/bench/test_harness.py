"""The benchmark harness runs end to end at tiny sizes: it checks the harness, not the speed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from app.settings import Settings
from bench.one_job_latency import HOPS
from bench.run import CLUSTER_SCENARIOS, SCENARIOS
from bench.stack import FERRY_MODULES, Stack, stack_settings
from deploy.processes import REPO_ROOT, free_port, settings_env

ONE_BROKER_SCENARIOS = [name for name in SCENARIOS if name not in CLUSTER_SCENARIOS]


@pytest.mark.timeout(900)
def test_quick_benchmark_writes_results_and_chart(kafka_bootstrap, tmp_path) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", ",".join(ONE_BROKER_SCENARIOS),
                    "--out", str(tmp_path)], cwd=REPO_ROOT, env=env, check=True, timeout=860)
    [run_dir] = tmp_path.iterdir()
    assert (run_dir / "chart.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["machine"]["cores"] == os.cpu_count()
    scenarios = results["scenarios"]
    submit = scenarios["submit"]
    for measured in (submit["ferry"], submit["ceiling_bare_aiohttp"], submit["ceiling_raw_aiokafka"]):
        assert measured["ok"] > 0 and measured["statuses"] == {"202": measured["requests"]}
    assert submit["ratio_to_bare"] > 0 and submit["ferry"]["api"]["rss_mb_max"] > 0
    e2e = scenarios["e2e"]["rate_50"]
    assert e2e["statuses"] == {"200": e2e["requests"]} and e2e["requests"] == 100  # 50/s for 2 s, all completed
    assert e2e["polls_per_job"] >= 1 and e2e["api_cpu_ms_per_request"] > 0  # each job polled until done
    floor = scenarios["floor"]["rate_50"]  # a job's Kafka trips alone: all 100 went round, each stage timed
    assert floor["jobs"] == floor["completed"] == 100 and floor["clients_cpu_ms_per_job"] > 0
    reached = floor["median_ms_from_start"]
    assert 0 < reached["pending_acked"] < reached["request_acked"] and reached["request_read"] < reached["outcome_read"]
    assert scenarios["inflight"]["rate_50"]["peak_in_flight"] > 0  # 2 s calls overlap
    assert scenarios["e2e"]["warmup"]["requests"] == 50  # 50/s for 1 s before the measured load
    first = scenarios["e2e"]["warmup"]["first_second"]  # all of that second's jobs, each with its latency
    assert first["jobs"] == 50 and first["p50_ms"] <= first["p99_ms"]
    restarted = scenarios["e2e"]["worker_restarted"]  # a fresh worker, then 50/s for 1 s at once
    assert restarted["statuses"] == {"200": 50} and restarted["first_second"]["jobs"] == 50
    backlog = scenarios["backlog"]["backlog"]
    assert backlog["jobs"] == 300 and backlog["worker_rss_series"]
    poll = scenarios["backlog"]["poll"]
    assert poll["statuses"] == {"200": poll["requests"]} and poll["api_cpu_ms_per_poll"] > 0
    rebalance = scenarios["rebalance"]
    # 20 jobs/s for 24 s while a second worker starts and is stopped: every job accepted ends, and was called.
    accepted = rebalance["jobs_submitted"]
    assert accepted + rebalance["submits_refused"] == 480 and accepted > 0 and rebalance["jobs_lost"] == 0
    assert rebalance["jobs_completed"] + rebalance["jobs_failed"] == accepted and rebalance["jobs_never_called"] == 0
    for event in ("join", "leave"):  # each rebalance found, and every partition's first call after it timed
        assert rebalance[event]["assigned_s_after"] is not None
        assert len(rebalance[event]["first_call_per_partition_s_after_assignment"]) == rebalance["partitions"]
    resume = scenarios["resume"]
    assert resume["calls_before_kill"] == 200 and resume["jobs_started_again"] == 200
    assert resume["all_restarted_s_after_assignment"] is not None
    mixed = scenarios["mixed"]  # 20 throttled jobs queued; 20 fast jobs/s for 2 s, alone then beside them
    assert mixed["throttled_jobs_queued"] == 20
    assert 0 <= mixed["throttled_jobs_waiting_at_end"] <= 20 and mixed["worker_calls_in_flight_at_end"] >= 0
    for load in (mixed["fast_alone"], mixed["fast_beside_throttled_backlog"]):
        assert load["statuses"] == {"200": 40}, load["statuses"]


@pytest.mark.timeout(900)
def test_quick_cluster_benchmarks_fail_over_and_scale(tmp_path) -> None:
    """The failover and scale scenarios on the three-node cluster (started for the run)."""
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--scenarios", ",".join(CLUSTER_SCENARIOS),
                    "--out", str(tmp_path)], cwd=REPO_ROOT, check=True, timeout=860)
    [run_dir] = tmp_path.iterdir()
    scenarios = json.loads((run_dir / "results.json").read_text())["scenarios"]
    leader = scenarios["failover"]["leader"]  # quick: only the leader's loss, 20 jobs/s
    assert [what.rsplit(" ", 1)[0] for what, _ in leader["events_s"]] == ["kill", "start", "in sync"]
    assert leader["submitted"] >= 200 and leader["completed"] == leader["accepted"] > 0
    assert leader["lost"] == 0 and leader["refused_but_called"] == 0 and leader["unexpected"] == []
    scale = scenarios["scale"]
    for workers in (1, 2, 3):
        step = scale[f"workers_{workers}"]
        assert step["completed_per_s"] > 0 and step["accepted"] > 0
        assert sum(name.startswith("worker_") for name in step["cpu_ms_per_job"]) == workers
        assert all(step["cpu_ms_per_job_by_kind"][kind] > 0 for kind in ("api", "worker", "broker"))


@pytest.mark.timeout(300)
def test_the_provider_client_comparison_measures_both_clients() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.provider_client", "--calls", "40", "--concurrency", "8",
                          "--rounds", "1"], cwd=REPO_ROOT, check=True, timeout=280, capture_output=True, text=True)
    measured = json.loads(run.stdout)["results"]["concurrency_8"]
    assert set(measured) == {"aiohttp", "httpx"}
    assert all(each["cpu_ms_per_call_median"] > 0 and each["calls_per_s_median"] > 0 for each in measured.values())


def test_the_benchmarks_run_ferry_at_its_shipped_log_level(tmp_path) -> None:
    """Benchmarks measure Ferry as a user gets it: the log level too (it was WARNING, not INFO)."""
    stack = Stack(stack_settings("127.0.0.1:9092", free_port()), tmp_path)
    shipped = Settings.model_fields["log_level"].default
    assert stack.settings.log_level == shipped
    for module in FERRY_MODULES:
        assert stack.process(module).env["FERRY_LOG_LEVEL"] == shipped
    assert stack.process("workers", FERRY_LOG_LEVEL="DEBUG").env["FERRY_LOG_LEVEL"] == "DEBUG"  # asked for


@pytest.mark.timeout(300)
async def test_one_job_latency_splits_each_trip_at_its_records(kafka_bootstrap, tmp_path) -> None:
    """``bench.one_job_latency --breakdown`` finds every job's three records and times each hop."""
    fake_port = free_port()
    stack = Stack(stack_settings(kafka_bootstrap, fake_port), tmp_path)
    try:
        stack.fake_provider(fake_port, 0.0)
        _, url = await stack.api()
        await stack.worker()
        run = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bench.one_job_latency", "--url", url, "--jobs", "3", "--breakdown"],
            cwd=REPO_ROOT, env=settings_env(stack.settings), check=True, timeout=240, capture_output=True, text=True)
    finally:
        await stack.close()
    lines = run.stdout.splitlines()
    assert lines[0].startswith("3 jobs, submit -> completed: median ")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [name for name, _, _ in HOPS]
    assert all(line.endswith("(3 jobs)") for line in lines[1:]), run.stdout


@pytest.mark.timeout(600)
async def test_compare_puts_ferry_and_another_gateway_side_by_side(kafka_bootstrap, tmp_path) -> None:
    """``--scenarios compare``: the same loads on Ferry and on the other URL (here a second Ferry,
    whose provider is the fake the harness starts on ``--fake-port``), in one results file."""
    fake_port = free_port()
    other = Stack(stack_settings(kafka_bootstrap, fake_port), tmp_path / "other")
    try:
        other_api, other_url = await other.api()
        await other.worker()
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "compare",
                             "--compare-url", other_url, "--fake-port", str(fake_port),
                             "--compare-header", "X-Bench: 1", "--compare-pid", str(other_api.pid),
                             "--out", str(tmp_path / "runs")],
            cwd=REPO_ROOT, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}, check=True, timeout=560)
    finally:
        await other.close()
    [run_dir] = (tmp_path / "runs").iterdir()
    compare = json.loads((run_dir / "results.json").read_text())["scenarios"]["compare"]
    assert compare["fake_provider"] == f"http://127.0.0.1:{fake_port}/v1"
    assert compare["other"]["url"] == other_url and compare["ferry"]["url"] != other_url
    for side in (compare["ferry"], compare["other"]):
        assert side["e2e_rate_50"]["statuses"] == {"200": 100}  # 50/s for 2 s, every job completed
        assert side["submit"]["ok"] > 0 and side["submit"]["statuses"] == {"202": side["submit"]["requests"]}
    assert compare["other"]["e2e_rate_50"]["other"]["cpu_percent"] > 0  # its process sampled
    assert compare["ferry"]["e2e_rate_50"]["worker"]["cpu_percent"] > 0


def test_compare_needs_its_url() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.run", "--scenarios", "compare"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--compare-url and the compare scenario go together" in run.stderr


def test_the_floor_says_when_kafka_cannot_be_reached() -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "bench.kafka_floor", "--bootstrap", f"127.0.0.1:{port}",
                           "--rate", "10", "--seconds", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert f"Kafka at 127.0.0.1:{port} failed" in done.stderr and "Traceback" not in done.stderr
