"""Workers joining and leaving cleanly: calls in flight on a moved partition are never made twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from api.routes import READ_MODEL
from app.jobs import JobStatus
from app.settings import Settings
from deploy.fakes.openai_server import FakeOpenAI
from deploy.processes import FerryProcess
from tests.chaos.test_chaos import calls_per_marker, job_body, report, states, submit_all, terminal_count, unfinished
from tests.conftest import PROVIDER_KEY, ferry_settings_for, start_api, wait_until


def long_call_settings(settings: Settings, fake: FakeOpenAI) -> Settings:
    """Settings whose provider timeout outlasts the fake's long calls."""
    return ferry_settings_for(settings, fake, kafka_session_timeout_seconds=6, providers={
        "openai": {"base_url": fake.base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 60}})


async def submit_until_all_in_flight(api, fake: FakeOpenAI, jobs: int) -> list[str]:
    ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
    await wait_until(lambda: len(fake.requests) >= jobs, 120, "every job's call to be in flight", 0.1)
    return ids


@pytest.mark.timeout(420)
async def test_a_worker_joining_while_calls_are_in_flight_repeats_no_call(settings: Settings,
                                                                          tmp_path: Path) -> None:
    # Calls long enough to be in flight through the rebalance and past the new owner's first
    # maintenance ticks (every 0.5 s here), which is when a moved job used to be started again.
    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=15.0).start()
    own = long_call_settings(settings, fake)
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    second = FerryProcess("workers", own, tmp_path / "worker-b")
    try:
        jobs = 120
        ids = await submit_until_all_in_flight(api, fake, jobs)
        view = api.server.app[READ_MODEL]
        second.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 240,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, own)}", 0.2)
        attempts = [view.get(job_id).attempts for job_id in ids]
    finally:
        first.kill()
        second.kill()
        await api.close()
        await fake.stop()

    final = states(api, ids)
    calls = calls_per_marker(fake)
    duplicates = sum(n - 1 for n in calls.values() if n > 1)
    report("worker_joins", submitted=jobs, completed=final[JobStatus.completed], duplicate_provider_calls=duplicates,
           restarted_jobs=sum(1 for n in attempts if n > 1))
    assert final[JobStatus.completed] == jobs
    assert duplicates == 0, {marker: n for marker, n in calls.items() if n > 1}
    assert max(attempts) == 1


@pytest.mark.timeout(420)
async def test_calls_announced_by_a_worker_that_then_dies_are_resumed(settings: Settings, tmp_path: Path) -> None:
    """A worker that handed its moved jobs' calls over as still running, then crashed: the new
    owner does not wait for outcomes that will never come; it starts those jobs again."""
    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=50.0).start()  # in flight until the kill
    own = long_call_settings(settings, fake)
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    second = FerryProcess("workers", own, tmp_path / "worker-b")
    try:
        jobs = 60
        ids = await submit_until_all_in_flight(api, fake, jobs)
        second.start()

        async def second_ready() -> bool:
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{second.web_port}/health/ready") as response:
                        return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(second_ready, 120, "the second worker to hold its partitions")
        first.kill()
        assert terminal_count(api, ids) == 0
        fake.latency = 0.1  # the calls made again end at once
        await wait_until(lambda: terminal_count(api, ids) == jobs, 240,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, own)}", 0.2)
    finally:
        first.kill()
        second.kill()
        await api.close()
        await fake.stop()

    final = states(api, ids)
    report("worker_joins_then_first_dies", submitted=jobs, completed=final[JobStatus.completed],
           calls=len(fake.requests))
    assert final[JobStatus.completed] == jobs
    assert len(fake.requests) == 2 * jobs  # each called by the first worker, then once more
