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

from api.errors import JOB_ID_HEADER
from api.routes import READ_MODEL
from app.jobs import JobStatus, RequestType
from app.settings import Settings
from app.topics import dead_letter_topic, request_topic
from deploy.fakes.base import ReceivedRequest
from deploy.fakes.openai_server import FakeOpenAI
from deploy.processes import FerryProcess
from tests.helpers import (
    CHAT,
    PROVIDER_KEY,
    calls_per_marker,
    committed_everything,
    delete_every_record,
    ferry_settings_for,
    job_body,
    read_topic,
    report,
    start_api,
    states,
    submit_all,
    terminal_count,
    unfinished,
    wait_until,
    worker_ready,
)


@pytest.fixture
async def slow_fake() -> FakeOpenAI:
    fake = await FakeOpenAI(api_key=PROVIDER_KEY, latency=0.5).start()
    yield fake
    await fake.stop()


@pytest.mark.timeout(420)
async def test_sigkill_a_worker_mid_run(settings: Settings, slow_fake: FakeOpenAI, tmp_path: Path) -> None:
    """Only the calls in flight when a worker dies are made again, each once, and no job is lost."""
    slots = 100
    # A provider timeout far past the pause below, so that no held call times out meanwhile.
    own = ferry_settings_for(settings, slow_fake, worker_max_in_flight=slots, kafka_session_timeout_seconds=6,
                             providers={"openai": {"base_url": slow_fake.base_url, "api_key": PROVIDER_KEY,
                                                   "timeout_seconds": 120}})
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    replacement = FerryProcess("workers", own, tmp_path / "worker-b")
    try:
        jobs = 1000
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
        await wait_until(lambda: terminal_count(api, ids) >= 250, 180, "a quarter of the jobs to finish", 0.1)
        # Kill at a moment whose calls in flight are known exactly: the fake holds its answers
        # until every slot of the worker is on a call at the fake (so no call is still on its
        # way) and every call answered before the hold is terminal in the read model (its
        # outcome is in Kafka). The calls the fake then holds are the ones in flight.
        slow_fake.hold_answers()
        await wait_until(lambda: slow_fake.in_flight == slots
                         and terminal_count(api, ids) == len(slow_fake.requests) - slots, 60,
                         lambda: f"the worker's calls to be held: {slow_fake.in_flight} held, "
                                 f"{len(slow_fake.requests)} received, {terminal_count(api, ids)} ended", 0.05)
        first.kill()
        killed_at = time.monotonic()
        in_flight_at_kill = slow_fake.in_flight
        view = api.server.app[READ_MODEL]
        terminal_at_kill = {f"job-{k}" for k, job_id in enumerate(ids) if view.get(job_id).status.is_terminal}
        held_at_kill = set(calls_per_marker(slow_fake)) - terminal_at_kill
        slow_fake.release_answers()  # to a dead worker's closed connections
        replacement.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 300,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, own)}", 0.2)
        recovered_in = time.monotonic() - killed_at
    finally:
        slow_fake.release_answers()
        first.kill()
        replacement.kill()
        await api.close()

    final = states(api, ids)
    lost = jobs - final[JobStatus.completed] - final[JobStatus.failed]
    errors = Counter(view.get(i).error.error.message for i in ids if view.get(i).status is JobStatus.failed)
    calls = calls_per_marker(slow_fake)
    repeated = {marker for marker, n in calls.items() if n > 1}
    duplicates = sum(n - 1 for n in calls.values())
    attempts = {f"job-{k}": view.get(job_id).attempts for k, job_id in enumerate(ids)}
    report("sigkill_worker", submitted=jobs, terminal_at_kill=len(terminal_at_kill),
           calls_in_flight_at_kill=in_flight_at_kill, completed=final[JobStatus.completed],
           failed=final[JobStatus.failed], lost=lost, duplicate_provider_calls=duplicates,
           seconds_from_kill_to_all_terminal=round(recovered_in, 1), errors=dict(errors),
           jobs_by_workers_that_started_them=dict(Counter(attempts.values())),
           repeated_calls_not_counted_in_attempts=sum(1 for m in repeated if attempts[m] < calls[m]))
    assert lost == 0 and final[JobStatus.completed] == jobs, final
    assert len(held_at_kill) == in_flight_at_kill == slots
    assert len(calls) == jobs  # every job reached the provider
    # What the design allows to happen twice, and only that: each call in flight at the kill is
    # made once more by the replacement; no other job is called twice (those terminal at the
    # kill included).
    assert repeated == held_at_kill
    assert duplicates == in_flight_at_kill


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
    marker_of: dict[str, str] = {}  # job id -> its marker
    answers: Counter = Counter()
    unconfirmed: set[str] = set()  # markers of submits refused with the job's id (they may run)
    stop_submitting = asyncio.Event()

    async def keep_submitting() -> None:
        i = 0
        while not stop_submitting.is_set():
            response = await api.post(CHAT, json=job_body(f"job-{i}"))
            answers[response.status] += 1
            if response.status == 202:
                accepted.append((await response.json())["id"])
                marker_of[accepted[-1]] = f"job-{i}"
            elif response.headers.get(JOB_ID_HEADER):  # 503 "not confirmed": the job may run
                unconfirmed.add(f"job-{i}")
            i += 1
            await asyncio.sleep(0.02)

    submitter = asyncio.create_task(keep_submitting())
    try:
        await wait_until(lambda: terminal_count(api, accepted) >= 50, 120, "work to flow", 0.1)
        private_broker.stop()
        stopped_at = time.monotonic()
        view = api.server.app[READ_MODEL]
        terminal_at_stop = {job_id for job_id in accepted if view.get(job_id) and view.get(job_id).status.is_terminal}
        # Each refusal takes the submit timeout (5 s): a submit waits out a failover before giving up.
        await wait_until(lambda: answers[503] >= 5, 120, "submits to be refused while the broker is away", 0.1)
        private_broker.start()
        accepted_during_outage = answers[202]
        await wait_until(lambda: answers[202] >= accepted_during_outage + 20, 120, "submits to be accepted again",
                         0.1)
        # The calls whose outcome was not in Kafka when it went away: in flight at the stop, or
        # made during the outage. Only these may be repeated (by the rebalance that follows).
        exposed = set(calls_per_marker(fake)) - {marker_of[job_id] for job_id in terminal_at_stop}
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
    lost = len(accepted) - final[JobStatus.completed] - final[JobStatus.failed]
    calls = calls_per_marker(fake)
    repeated = {marker for marker, n in calls.items() if n > 1}
    duplicates = sum(n - 1 for n in calls.values())
    report("broker_restart", submitted=len(accepted), answers=dict(answers), completed=final[JobStatus.completed],
           failed=final[JobStatus.failed], lost=lost, calls_exposed_to_the_outage=len(exposed),
           duplicate_provider_calls=duplicates, seconds_from_stop_to_all_terminal=round(recovered_in, 1))
    assert set(answers) <= {202, 503}, answers
    assert answers[202] == len(accepted)
    assert lost == 0 and final[JobStatus.completed] == len(accepted), final
    # Every accepted job reached the provider; any other call is a submit answered "not confirmed".
    assert set(marker_of.values()) <= set(calls) <= set(marker_of.values()) | unconfirmed
    # A job whose outcome Kafka held before the outage is never called again; one exposed to it
    # at most once more.
    assert repeated <= exposed and all(calls[marker] == 2 for marker in repeated), (repeated, exposed)
    assert duplicates <= len(exposed)


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
    assert retry["status_code"] == 429 and 1 <= retry["attempt"] <= 30
    assert final[JobStatus.completed] == jobs
    assert len(gaps) == 30  # each refused call was retried once it was allowed
    assert min(gaps) >= 1.0  # Retry-After: 1 was honoured (the backoff alone would be ~0.05 s)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("record_after", [0.0, 60.0], ids=["processing-first", "quiet-first-start"])
async def test_poison_job_is_failed_and_dead_lettered(settings: Settings, tmp_path: Path, record_after: float) -> None:
    """With ``processing`` written before each call, each crash counts; with the first call started
    quietly (its record held back for longer than the crash takes), the first crash goes
    uncounted: the redelivered request's start is recorded, and the limit holds from there."""
    fake = await FakeOpenAI(api_key=PROVIDER_KEY).start()
    # One call at a time: the jobs behind the poison are never in flight when it kills a worker
    # (a job in flight at two crashes would rightly be abandoned too).
    own = ferry_settings_for(settings, fake, topic_partitions=1, job_max_attempts=2, kafka_session_timeout_seconds=6,
                             worker_max_in_flight=1, worker_processing_record_after_seconds=record_after)
    uncounted_crashes = 1 if record_after else 0
    workers: list[FerryProcess] = []
    crashes = 0

    def start_worker() -> None:
        workers.append(FerryProcess("workers", own, tmp_path / f"worker-{len(workers)}").start())

    def crash_on_poison(received: ReceivedRequest) -> None:
        nonlocal crashes
        if received.body["messages"][-1]["content"] == "poison":
            workers[-1].kill()  # the job takes its worker down, every time
            crashes += 1
            start_worker()

    fake.on_request = crash_on_poison
    api = await start_api(own)
    start_worker()
    try:
        await worker_ready(workers[0], "first")  # the poison is submitted after its assignment
        [poison] = await submit_all(api, [job_body("poison", latency=5)])
        behind = await submit_all(api, [job_body(f"job-{i}") for i in range(20)])
        await wait_until(lambda: terminal_count(api, [poison, *behind]) == 21, 300, "every job to end", 0.2)
        poisoned = await (await api.get(f"{CHAT}/{poison}")).json()
        poison_attempts = api.server.app[READ_MODEL].get(poison).attempts
        # The copy is acknowledged before the job is failed: all of it is there to read now.
        dead_letters = await read_topic(own, dead_letter_topic(own))
    finally:
        for process in workers:
            process.kill()
        await api.close()
        await fake.stop()

    final = states(api, [poison, *behind])
    calls = calls_per_marker(fake)
    report("poison", submitted=21, completed=final[JobStatus.completed], failed=final[JobStatus.failed],
           lost=21 - final[JobStatus.completed] - final[JobStatus.failed], workers_crashed=crashes,
           poison_attempts=poison_attempts, poison_calls=calls["poison"], dead_lettered=len(dead_letters))
    assert poisoned["status"] == "failed" and poisoned["status_code"] == 500
    assert poisoned["error"]["error"]["message"].startswith("job abandoned after 2 attempts")
    # Started by job_max_attempts workers, each killed by its call; the next one gave up on it
    # without calling, and ran the jobs behind it once each.
    assert poison_attempts == own.job_max_attempts == crashes - uncounted_crashes
    assert len(workers) == crashes + 1
    assert calls == Counter({"poison": crashes} | {f"job-{i}": 1 for i in range(20)})
    assert final == Counter({JobStatus.completed: 20, JobStatus.failed: 1})
    # Copied to the dead-letter topic once, the request as submitted.
    [(key, value)] = dead_letters
    assert key == poison
    assert json.loads(value)["body"]["messages"][-1]["content"] == "poison"


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
    duplicates = sum(n - 1 for n in calls.values())
    report("sigterm_worker", submitted=jobs, calls_in_flight_window=calls_by_first - calls_before,
           terminal_at_exit=len(terminal_at_exit), exit_code=exit_code, seconds_to_exit=round(drained_in, 1),
           completed=final[JobStatus.completed], failed=final[JobStatus.failed],
           lost=jobs - final[JobStatus.completed] - final[JobStatus.failed], duplicate_provider_calls=duplicates,
           seconds_from_sigterm_to_all_terminal=round(recovered_in, 1))
    assert exit_code == 0
    assert final[JobStatus.completed] == jobs
    # Calls in flight at SIGTERM finished inside the grace period, so nothing was called twice.
    assert duplicates == 0 and len(calls) == jobs


@pytest.mark.timeout(300)
async def test_jobs_waiting_in_a_lane_survive_a_sigkill(settings: Settings, fake_openai: FakeOpenAI,
                                                        tmp_path: Path) -> None:
    """Jobs waiting for a throttled provider have their requests committed, so only their waiting
    records keep them: a killed worker's replacement finds them in the table and calls each once
    (but for a call in flight at the kill)."""
    provider = {"base_url": fake_openai.base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 5}
    throttled = ferry_settings_for(settings, fake_openai, providers={"openai": provider | {"requests_per_minute": 60}})
    unthrottled = ferry_settings_for(settings, fake_openai, providers={"openai": provider})
    api = await start_api(throttled)
    first = FerryProcess("workers", throttled, tmp_path / "worker-a").start()
    replacement = FerryProcess("workers", unthrottled, tmp_path / "worker-b")
    view = api.server.app[READ_MODEL]
    try:
        jobs = 40
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])

        async def every_request_taken_and_committed() -> bool:
            waiting = sum(1 for i in ids if view.get(i) is not None and view.get(i).waiting_for == "openai")
            return waiting + terminal_count(api, ids) >= jobs - 1 and await committed_everything(throttled)

        await wait_until(every_request_taken_and_committed, 60,
                         lambda: f"the jobs to wait in their lane, committed: {states(api, ids)}", 0.1)
        first.kill()
        await asyncio.sleep(1)  # the read model catches up with the dead worker's last writes
        started_at_kill = {f"job-{k}" for k, i in enumerate(ids) if view.get(i).status is JobStatus.processing}
        ended_at_kill = terminal_count(api, ids)
        replacement.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 120,
                         lambda: f"every job to end: {states(api, ids)}; not ended: {unfinished(api, ids, throttled)}",
                         0.2)
    finally:
        first.kill()
        replacement.kill()
        await api.close()

    calls = calls_per_marker(fake_openai)
    repeated = {marker for marker, n in calls.items() if n > 1}
    report("sigkill_lane", submitted=jobs, ended_at_kill=ended_at_kill, started_at_kill=len(started_at_kill),
           duplicate_provider_calls=sum(n - 1 for n in calls.values()))
    assert states(api, ids)[JobStatus.completed] == jobs
    assert ended_at_kill < jobs - 10  # most of them were waiting
    assert len(calls) == jobs and repeated <= started_at_kill


@pytest.mark.timeout(300)
async def test_jobs_resumed_after_retention_removed_their_requests_end_with_an_error(
        settings: Settings, slow_fake: FakeOpenAI, tmp_path: Path) -> None:
    """A worker dies mid-call, and by the time another resumes the jobs retention has removed
    their requests: they end with the service's 500, not stay `processing` for ever (the read
    of a removed request waited for a record past the partition's end and was retried)."""
    own = ferry_settings_for(settings, slow_fake, kafka_session_timeout_seconds=6,
                             providers={"openai": {"base_url": slow_fake.base_url, "api_key": PROVIDER_KEY,
                                                   "timeout_seconds": 120}})
    api = await start_api(own)
    first = FerryProcess("workers", own, tmp_path / "worker-a").start()
    replacement = FerryProcess("workers", own, tmp_path / "worker-b")
    jobs = 3
    try:
        slow_fake.hold_answers()
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(jobs)])
        await wait_until(lambda: slow_fake.in_flight == jobs, 120, "every call to be held at the provider")
        first.kill()
        await delete_every_record(own, request_topic(own, RequestType.chat_completion))
        slow_fake.release_answers()  # to the dead worker's closed connections
        replacement.start()
        await wait_until(lambda: terminal_count(api, ids) == jobs, 120,
                         lambda: f"every job to end: {states(api, ids)}", 0.2)
    finally:
        slow_fake.release_answers()
        first.kill()
        replacement.kill()
        await api.close()
    view = api.server.app[READ_MODEL]
    assert [view.get(i).status_code for i in ids] == [500] * jobs
    assert {view.get(i).error.error.message for i in ids} == {
        "the job's request is no longer in Kafka (retention removed it)"}
    assert len(slow_fake.requests) == jobs  # nothing called again
