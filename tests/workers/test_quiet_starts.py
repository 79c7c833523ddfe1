"""Quiet starts: a fast call of a request no worker can have taken is recorded by its outcome
alone; a slow call, a request that was in Kafka before the worker's assignment, and a worker
set to record every start write ``processing`` first. (Revocations and crashes during quiet
calls: tests/chaos/test_rebalance.py and the poison test in tests/chaos/test_chaos.py.)"""

from __future__ import annotations

import asyncio
import uuid

from app.jobs import JobRequest, JobState, JobStatus, Outcome, RequestLocation, RequestType, Target, utcnow
from app.settings import Settings
from app.topics import changelog_topic, request_topic
from deploy.fakes.openai_server import FakeOpenAI
from tests.helpers import (
    calls_per_marker,
    committed_everything,
    ferry_settings_for,
    job_body,
    poll_until_done,
    read_records,
    start_api,
    submit_all,
    wait_until,
    worker_running,
)
from workers.quiet_starts import QuietStarts

LOCATION = RequestLocation(topic="requests", partition=3, offset=17)


def started_job() -> JobState:
    request = JobRequest(id=str(uuid.uuid4()), request_type=RequestType.chat_completion, created_at=utcnow(),
                         ttl_seconds=60, targets=[Target.parse("openai/gpt-4o")], body={})
    return JobState.pending(request).processing(LOCATION, runner="http://worker:6066/a")


class Table:
    """What the quiet starts write, each write's future left for the test to settle."""

    def __init__(self) -> None:
        self.written: list[tuple[JobState, asyncio.Future]] = []

    def write(self, state: JobState) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.written.append((state, future))
        return future

    @property
    def states(self) -> list[JobState]:
        return [state for state, _ in self.written]


# -- bookkeeping, without Kafka ---------------------------------------------------------------------

async def test_a_call_that_ends_in_time_writes_its_outcome_as_its_first_record() -> None:
    table, started = Table(), started_job()
    quiet = QuietStarts(600, table.write)
    recorded = quiet.start(started)
    assert started.id in quiet and table.written == [] and not recorded.done()

    write = quiet.finish(started.id, Outcome(status_code=200, result={"id": "x"}))
    [finished] = table.states
    assert finished.status is JobStatus.completed and finished.result == {"id": "x"}
    # The attempt is counted, and where the request sits and who ran it kept, as processing would have.
    assert (finished.attempts, finished.request, finished.runner) == (1, LOCATION, "http://worker:6066/a")
    assert started.id not in quiet and not recorded.done()
    assert write is table.written[0][1]
    write.set_result("acknowledged")
    await asyncio.sleep(0)
    assert recorded.result() == "acknowledged"
    quiet.record_now(started.id)  # its timer or a late retry report: nothing more is written
    assert len(table.written) == 1


async def test_a_call_that_outlasts_the_moment_writes_processing_then_its_outcome_is_not_held() -> None:
    table, started = Table(), started_job()
    quiet = QuietStarts(0.01, table.write)
    recorded = quiet.start(started)
    await wait_until(lambda: table.written, 10, "the processing record")
    assert table.states == [started] and started.id not in quiet
    assert quiet.finish(started.id, Outcome(status_code=200, result={})) is None  # written as usual
    table.written[0][1].set_exception(ConnectionError("broker away"))
    await asyncio.sleep(0)
    assert isinstance(recorded.exception(), ConnectionError)  # whoever acks the request sends it again


async def test_a_revocation_writes_every_held_start_once_with_its_own_writer() -> None:
    table, revoking = Table(), Table()
    quiet = QuietStarts(600, table.write)
    jobs = [started_job() for _ in range(3)]
    for job in jobs:
        quiet.start(job)
    quiet.record_all(revoking.write)
    quiet.record_all(revoking.write)
    assert revoking.states == jobs and table.written == []
    assert all(job.id not in quiet for job in jobs)


async def test_a_start_not_writable_when_due_stays_held_for_the_revocation() -> None:
    """Faust marks a rebalance as begun (no partition writable) before the revocation reaches the
    worker: a timer or an outcome due in between dropped the held start, nothing was written, and
    the partition's next owner found the job pending and called the provider again."""
    table, revoking, writable = Table(), Table(), False
    quiet = QuietStarts(600, lambda state: table.write(state) if writable else None)
    started = started_job()
    recorded = quiet.start(started)
    quiet.record_now(started.id)  # its timer, in that moment
    assert quiet.finish(started.id, Outcome(status_code=200, result={})) is None  # to job events
    assert started.id in quiet and quiet.recorded(started.id) is recorded and table.written == []

    quiet.record_all(revoking.write)  # the revocation: the next owner sees the call as processing
    assert revoking.states == [started] and started.id not in quiet and quiet.recorded(started.id) is None
    revoking.written[0][1].set_result("acknowledged")
    await asyncio.sleep(0)
    assert recorded.result() == "acknowledged"  # the request is acked now
    writable = True
    quiet.record_now(started.id)
    assert table.written == []


# -- a worker and the API on a real broker ----------------------------------------------------------

async def changelog_history(settings: Settings, job_ids: list[str]) -> dict[str, list[JobState]]:
    history: dict[str, list[JobState]] = {job_id: [] for job_id in job_ids}
    for record in await read_records(settings, changelog_topic(settings)):
        if record.key.decode() in history and record.value is not None:
            history[record.key.decode()].append(JobState.from_bytes(record.value))
    return history


def statuses(states: list[JobState]) -> list[str]:
    return [state.status.value for state in states]


async def test_only_a_fast_call_of_a_request_newer_than_the_assignment_skips_processing(
        settings: Settings, fake_openai: FakeOpenAI) -> None:
    # Held back 2 s: a busy machine cannot make the fast call outlast it, the slow one (3 s) does.
    own = ferry_settings_for(settings, fake_openai, worker_processing_record_after_seconds=2.0)
    api = await start_api(own)
    try:
        # In Kafka before the worker is assigned its partition: another worker might have taken it.
        [early] = await submit_all(api, [job_body("early")])
        async with worker_running(own) as worker:
            await poll_until_done(api, early)
            await wait_until(lambda: worker.assignment_noted, 30, "the assignment to be noted")
            fast, slow = await submit_all(api, [job_body("fast"), job_body("slow", latency=3.0)])
            for job_id in (fast, slow):
                assert (await poll_until_done(api, job_id))["status"] == "completed"
            # Each request was acked once Kafka had its job's first record: all of them committed.
            await wait_until(lambda: committed_everything(own), 30, "every request to be committed", 0.2)
            runner = worker.id
    finally:
        await api.close()

    history = await changelog_history(own, [early, fast, slow])
    assert statuses(history[fast]) == ["pending", "completed"]
    assert statuses(history[slow]) == ["pending", "processing", "completed"]
    assert statuses(history[early]) == ["pending", "processing", "completed"]
    for job_id in (early, fast, slow):
        done = history[job_id][-1]
        assert (done.attempts, done.runner) == (1, runner)
        assert done.request is not None and done.request.topic == request_topic(own, RequestType.chat_completion)
    assert calls_per_marker(fake_openai) == {"early": 1, "fast": 1, "slow": 1}


async def test_a_worker_set_to_record_every_start_writes_processing_before_a_fast_call(
        settings: Settings, fake_openai: FakeOpenAI) -> None:
    own = ferry_settings_for(settings, fake_openai, worker_processing_record_after_seconds=0)
    api = await start_api(own)
    try:
        async with worker_running(own) as worker:
            await wait_until(lambda: worker.assignment_noted, 30, "the assignment to be noted")
            [job] = await submit_all(api, [job_body("fast")])
            assert (await poll_until_done(api, job))["status"] == "completed"
    finally:
        await api.close()
    history = await changelog_history(own, [job])
    assert statuses(history[job]) == ["pending", "processing", "completed"]
