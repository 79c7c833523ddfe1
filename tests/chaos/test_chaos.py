"""Chaos: kill workers, stop the broker, throttle the provider, feed a poison job. Every job
answered 202 must end completed or failed. Each test prints a CHAOS line with its figures
(run with ``-s`` to see them)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from api.routes import READ_MODEL
from app.jobs import JobStatus
from app.settings import Settings
from app.topics import dead_letter_topic
from deploy.fakes.base import ReceivedRequest
from deploy.fakes.openai_server import FakeOpenAI
from deploy.processes import FerryProcess
from tests.helpers import (
    CHAT,
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
)


@pytest.fixture
async def slow_fake() -> FakeOpenAI:

    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=0.5).start()
    yield fake
    await fake.stop()


@pytest.mark.timeout(420)
async def test_sigkill_a_worker_mid_run(settings: Settings, slow_fake: FakeOpenAI, tmp_path: Path) -> None:
    own = ferry_settings_for(settings, slow_fake, worker_max_in_flight=100, kafka_session_timeout_seconds=6)
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    replacement = FerryProcess("workers", own, tmp_path / "worker-b")
    try:
        jobs = 1000
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
        await wait_until(lambda: terminal_count(api, ids) >= 250, 180, "a quarter of the jobs to finish", 0.1)
        first.kill()
        killed_at = time.monotonic()
        view = api.server.app[READ_MODEL]
        terminal_at_kill = {k for k, job_id in enumerate(ids) if view.get(job_id).status.is_terminal}
        at_kill = len(terminal_at_kill)
        replacement.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 300,
                         lambda: f"every job to end: {states(api, ids)} {own.topic_prefix} "
                                 f"{[i for i in ids if not api.server.app[READ_MODEL].get(i).status.is_terminal]}", 0.2)
        recovered_in = time.monotonic() - killed_at
    finally:
        first.kill()
        replacement.kill()
        await api.close()

    final = states(api, ids)
    errors = Counter(view.get(i).error.error.message for i in ids if view.get(i).status is JobStatus.failed)
    calls = calls_per_marker(slow_fake)
    duplicates = sum(n - 1 for n in calls.values() if n > 1)
    attempts = Counter(view.get(i).attempts for i in ids)
    report("sigkill_worker", submitted=jobs, terminal_at_kill=at_kill, completed=final[JobStatus.completed],
           failed=final[JobStatus.failed], lost=jobs - final[JobStatus.completed] - final[JobStatus.failed],
           duplicate_provider_calls=duplicates, seconds_from_kill_to_all_terminal=round(recovered_in, 1),
           errors=dict(errors), jobs_by_workers_that_started_them=dict(attempts))
    assert final[JobStatus.completed] == jobs
    assert len(calls) == jobs  # every job reached the provider
    # A job already terminal in the table is never sent to a provider again; the repeats are
    # calls that were in flight, or finished but not yet recorded, when the worker died.
    assert all(calls[f"job-{k}"] == 1 for k in terminal_at_kill)
    assert duplicates <= jobs - at_kill


@pytest.mark.timeout(420)
async def test_broker_stop_and_restart_during_submit_and_processing(private_broker, settings: Settings,
                                                                     tmp_path: Path) -> None:

    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=0.2).start()
    private_broker.start()
    own = ferry_settings_for(settings, fake, kafka_bootstrap_servers=private_broker.bootstrap_servers,
                             kafka_session_timeout_seconds=6)
    api = await start_api(own)
    worker = FerryProcess("workers", own, tmp_path / "worker").start()
    accepted: list[str] = []
    answers: Counter = Counter()
    stop_submitting = asyncio.Event()

    async def keep_submitting() -> None:
        i = 0
        while not stop_submitting.is_set():
            response = await api.post(CHAT, json=job_body(f"job-{i}"))
            answers[response.status] += 1
            if response.status == 202:
                accepted.append((await response.json())["id"])
            i += 1
            await asyncio.sleep(0.02)

    submitter = asyncio.create_task(keep_submitting())
    try:
        await wait_until(lambda: terminal_count(api, accepted) >= 50, 120, "work to flow", 0.1)
        private_broker.stop()
        stopped_at = time.monotonic()
        await wait_until(lambda: answers[503] >= 20, 60, "submits to be refused while the broker is away", 0.1)
        private_broker.start()
        accepted_during_outage = answers[202]
        await wait_until(lambda: answers[202] >= accepted_during_outage + 20, 120, "submits to be accepted again",
                         0.1)
        stop_submitting.set()
        await submitter
        await wait_until(lambda: terminal_count(api, accepted) == len(accepted), 240,
                         lambda: f"every accepted job to end: {states(api, accepted)} {dict(answers)}", 0.2)
        recovered_in = time.monotonic() - stopped_at
    finally:
        stop_submitting.set()
        await asyncio.gather(submitter, return_exceptions=True)
        worker.kill()
        await api.close()
        await fake.stop()

    final = states(api, accepted)
    calls = calls_per_marker(fake)
    report("broker_restart", submitted=len(accepted), answers=dict(answers), completed=final[JobStatus.completed],
           failed=final[JobStatus.failed], lost=len(accepted) - final[JobStatus.completed] - final[JobStatus.failed],
           duplicate_provider_calls=sum(n - 1 for n in calls.values() if n > 1),
           seconds_from_stop_to_all_terminal=round(recovered_in, 1))
    assert set(answers) <= {202, 503}, answers
    assert answers[503] > 0
    assert final[JobStatus.completed] == len(accepted)


@pytest.mark.timeout(300)
async def test_provider_429_with_retry_after_then_recovery(settings: Settings, fake_openai: FakeOpenAI,
                                                           tmp_path: Path) -> None:
    # Which jobs meet the 30 refusals, and how many each, depends on the order the worker takes
    # them; enough attempts that no job runs out, whatever the order (running out is tested
    # in tests/e2e/test_endpoints.py).
    own = ferry_settings_for(settings, fake_openai, retry_initial_backoff_seconds=0.05, retry_max_attempts=31)
    fake_openai.fail_next = [(429, 1.0)] * 30  # the first 30 calls are refused with Retry-After: 1
    api = await start_api(own)
    worker = FerryProcess("workers", own, tmp_path / "worker").start()
    try:
        jobs = 20
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])

        async def shows_retry():
            # Any job: which ones meet the 30 refusals depends on the order the worker takes them.
            view = api.server.app[READ_MODEL]
            retrying = [job_id for job_id in ids if view.get(job_id) and view.get(job_id).retry is not None]
            for job_id in retrying[:3]:
                body = await (await api.get(f"{CHAT}/{job_id}")).json()
                if body["status"] == "processing" and "retry" in body:
                    return body["retry"]
            return None

        retry = await wait_until(shows_retry, 60, "a job to show that it is retrying", 0.02)
        await wait_until(lambda: terminal_count(api, ids) == jobs, 120, "every job to end", 0.1)
    finally:
        worker.kill()
        await api.close()

    final = states(api, ids)
    by_job: dict[str, list[float]] = {}
    for received in fake_openai.requests:
        by_job.setdefault(received.body["messages"][-1]["content"], []).append(received.received_at)
    gaps = [later - earlier for times in by_job.values() for earlier, later in zip(times, times[1:], strict=False)]
    report("provider_429", submitted=jobs, completed=final[JobStatus.completed], failed=final[JobStatus.failed],
           lost=jobs - final[JobStatus.completed] - final[JobStatus.failed], refused_calls=30,
           retries=len(gaps), shortest_gap_between_calls_of_a_job=round(min(gaps), 3))
    assert retry["status_code"] == 429 and retry["attempt"] >= 1
    assert final[JobStatus.completed] == jobs
    assert len(gaps) == 30  # each refused call was retried once it was allowed
    assert min(gaps) >= 1.0  # Retry-After: 1 was honoured (the backoff alone would be ~0.05 s)


@pytest.mark.timeout(420)
async def test_poison_job_is_failed_and_dead_lettered(settings: Settings, tmp_path: Path, kafka_bootstrap) -> None:
    from aiokafka import AIOKafkaConsumer


    fake = await FakeOpenAI(api_key=PROVIDER_KEY).start()
    # One call at a time: the jobs behind the poison are never in flight when it kills a worker
    # (a job in flight at two crashes would rightly be abandoned too).
    own = ferry_settings_for(settings, fake, topic_partitions=1, job_max_attempts=2, kafka_session_timeout_seconds=6,
                             worker_max_in_flight=1)
    workers: list[FerryProcess] = []

    def start_worker() -> None:
        workers.append(FerryProcess("workers", own, tmp_path / f"worker-{len(workers)}").start())

    def crash_on_poison(received: ReceivedRequest) -> None:
        if received.body["messages"][-1]["content"] == "poison":
            workers[-1].kill()  # the job takes its worker down, every time
            start_worker()

    fake.on_request = crash_on_poison
    api = await start_api(own)
    start_worker()
    try:
        [poison] = await submit_all(api, [job_body("poison", latency=5)])
        behind = await submit_all(api, [job_body(f"job-{i}") for i in range(20)])
        await wait_until(lambda: terminal_count(api, [poison, *behind]) == 21, 300, "every job to end", 0.2)
        poisoned = await (await api.get(f"{CHAT}/{poison}")).json()

        consumer = AIOKafkaConsumer(dead_letter_topic(own), bootstrap_servers=kafka_bootstrap,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            record = await asyncio.wait_for(consumer.getone(), 30)
        finally:
            await consumer.stop()
    finally:
        for process in workers:
            process.kill()
        await api.close()
        await fake.stop()

    final = states(api, behind)
    report("poison", submitted=21, completed=final[JobStatus.completed], failed=1 + final[JobStatus.failed],
           lost=0, workers_crashed=len(workers) - 1, dead_lettered=1)
    assert poisoned["status"] == "failed" and poisoned["status_code"] == 500
    assert poisoned["error"]["error"]["message"].startswith("job abandoned after 2 attempts")
    assert record.key.decode() == poison
    assert json.loads(record.value)["body"]["messages"][-1]["content"] == "poison"
    assert final[JobStatus.completed] == 20
    assert len(workers) == 3  # two crashed, the third gave up on the job



@pytest.mark.timeout(420)
async def test_sigterm_drains_calls_in_flight_then_a_replacement_finishes(settings: Settings, slow_fake: FakeOpenAI,
                                                                          tmp_path: Path) -> None:
    own = ferry_settings_for(settings, slow_fake, worker_max_in_flight=50, kafka_session_timeout_seconds=6,
                             worker_shutdown_grace_seconds=20)
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    replacement = FerryProcess("workers", own, tmp_path / "worker-b")
    try:
        jobs = 400
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
        await wait_until(lambda: terminal_count(api, ids) >= 100, 180, "a quarter of the jobs to finish", 0.1)
        calls_before = len(slow_fake.requests)
        stopped_at = time.monotonic()
        # The fake provider lives in this event loop: wait for the worker's exit in a thread.
        exit_code = await asyncio.to_thread(first.terminate, 60)
        drained_in = time.monotonic() - stopped_at
        calls_by_first = len(slow_fake.requests)
        view = api.server.app[READ_MODEL]
        terminal_at_exit = {k for k, job_id in enumerate(ids) if view.get(job_id).status.is_terminal}
        replacement.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 300,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, own)}", 0.2)
        recovered_in = time.monotonic() - stopped_at
    finally:
        first.kill()
        replacement.kill()
        await api.close()

    final = states(api, ids)
    calls = calls_per_marker(slow_fake)
    duplicates = sum(n - 1 for n in calls.values() if n > 1)
    report("sigterm_worker", submitted=jobs, calls_in_flight_window=calls_by_first - calls_before,
           terminal_at_exit=len(terminal_at_exit), exit_code=exit_code, seconds_to_exit=round(drained_in, 1),
           completed=final[JobStatus.completed], failed=final[JobStatus.failed],
           lost=jobs - final[JobStatus.completed] - final[JobStatus.failed], duplicate_provider_calls=duplicates,
           seconds_from_sigterm_to_all_terminal=round(recovered_in, 1))
    assert exit_code == 0
    assert final[JobStatus.completed] == jobs
    assert all(calls[f"job-{k}"] == 1 for k in terminal_at_exit)
    # Calls in flight at SIGTERM finished inside the grace period, so nothing was called twice.
    assert duplicates == 0
