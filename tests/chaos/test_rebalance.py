"""A worker joining while calls are in flight: no call is made twice, no job is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.routes import READ_MODEL
from app.jobs import JobStatus
from app.settings import Settings
from deploy.fakes.openai_server import FakeOpenAI
from deploy.processes import FerryProcess
from tests.helpers import (
    PROVIDER_KEY,
    calls_per_marker,
    ferry_settings_for,
    job_body,
    report,
    start_api,
    states,
    submit_all,
    terminal_count,
    unfinished,
    wait_until,
    worker_ready,
)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("record_after", [Settings().worker_processing_record_after_seconds, 600.0],
                         ids=["processing-recorded", "quiet-until-revoked"])
async def test_a_worker_joining_while_calls_run_repeats_no_call(settings: Settings, tmp_path: Path,
                                                                record_after: float) -> None:
    """The calls in flight on partitions that move to the joining worker keep running where they
    started; their outcomes reach the new owner through job events, and the new owner does not
    start them again, since the worker that runs them is still in the group. Calls started
    quietly, whose ``processing`` records are held back past the rebalance, have them written as
    their partitions are revoked: the new owner does not take their requests again."""
    # Calls long enough to be in flight through the rebalance and past the new owner's first
    # maintenance ticks; a provider timeout that outlasts them.
    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=15.0).start()
    own = ferry_settings_for(settings, fake, kafka_session_timeout_seconds=6, providers={
        "openai": {"base_url": fake.base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 60}},
        worker_processing_record_after_seconds=record_after)
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    second = FerryProcess("workers", own, tmp_path / "worker-b")
    try:
        await worker_ready(first, "first")  # the jobs come after its assignment: their starts are quiet
        jobs = 120
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
        await wait_until(lambda: len(fake.requests) >= jobs, 120, "every job's call to be in flight", 0.1)
        second.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 240,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, own)}", 0.2)
        view = api.server.app[READ_MODEL]
        attempts = {f"job-{i}": view.get(job_id).attempts for i, job_id in enumerate(ids)}
    finally:
        first.kill()
        second.kill()
        await api.close()
        await fake.stop()

    final = states(api, ids)
    calls = calls_per_marker(fake)
    report("worker_joins", submitted=jobs, completed=final[JobStatus.completed],
           duplicate_provider_calls=sum(n - 1 for n in calls.values() if n > 1),
           restarted_jobs=sum(1 for n in attempts.values() if n > 1))
    assert final[JobStatus.completed] == jobs
    assert calls == {marker: 1 for marker in attempts}, "no call made twice"
    assert attempts == {marker: 1 for marker in attempts}, "no job started twice"


@pytest.mark.timeout(420)
async def test_jobs_waiting_in_a_lane_move_with_their_partitions_and_run_once(settings: Settings,
                                                                            tmp_path: Path) -> None:
    """Jobs waiting for a limited provider are acked off the request topic; when a worker joins,
    the partitions' new owner finds them in the table and starts them, and each runs once."""
    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=0.3).start()
    peak = 0

    def note_concurrency(_request) -> None:
        nonlocal peak
        peak = max(peak, fake.in_flight)

    fake.on_request = note_concurrency
    own = ferry_settings_for(settings, fake, kafka_session_timeout_seconds=6, providers={
        "openai": {"base_url": fake.base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 60, "max_concurrency": 2}})
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    second = FerryProcess("workers", own, tmp_path / "worker-b")
    view = api.server.app[READ_MODEL]
    try:
        jobs = 80
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
        await wait_until(lambda: sum(1 for i in ids if view.get(i) is not None and view.get(i).waiting_for) >= 50, 60,
                         lambda: f"most jobs to wait in their lane: {states(api, ids)}", 0.1)
        waiting_at_join = sum(1 for i in ids if view.get(i).waiting_for)
        second.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 240,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, own)}", 0.2)
    finally:
        first.kill()
        second.kill()
        await api.close()
        await fake.stop()

    calls = calls_per_marker(fake)
    report("lane_worker_joins", submitted=jobs, waiting_at_join=waiting_at_join, peak_calls_at_once=peak,
           duplicate_provider_calls=sum(n - 1 for n in calls.values() if n > 1))
    assert states(api, ids)[JobStatus.completed] == jobs
    assert len(calls) == jobs and set(calls.values()) == {1}
    assert peak <= 4  # two calls at once per worker, two workers
