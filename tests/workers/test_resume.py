"""Orphaned jobs: resumed by the partition's owner once the worker that ran them has left the group,
never while it is in the group, never by the request stream; their requests read in batches."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.jobs import JobRequest, JobState, JobStatus, RequestLocation, RequestType
from app.settings import Settings
from app.topics import changelog_topic, partition_for, request_topic
from deploy.fakes.openai_server import FakeOpenAI
from tests.helpers import calls_per_marker, job_body, start_api, submit_all, wait_until, worker_running
from workers import maintenance
from workers.request_fetcher import _runs

GONE = "http://gone:6066/a-worker-that-was-killed"
ALIVE = "http://elsewhere:6066/a-worker-still-in-the-group"


def test_runs_cover_the_offsets_and_split_at_long_stretches_of_unwanted_records() -> None:
    assert _runs([]) == []
    assert _runs([5]) == [(5, 6)]
    assert _runs([0, 1, 2, 700], max_skipped=500) == [(0, 3), (700, 701)]
    assert _runs([0, 400, 800], max_skipped=500) == [(0, 801)]


async def orphan_them(settings: Settings, ids: list[str], runner_of) -> None:
    """Write, as a killed worker would have left them, ``processing`` states for the jobs whose
    requests are in Kafka (read back from the request topic, for their offsets)."""
    topic = request_topic(settings, RequestType.chat_completion)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, tuple[RequestLocation, JobRequest]] = {}
    try:
        while len(found) < len(ids):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    request = JobRequest.from_bytes(record.value)
                    found[request.id] = (RequestLocation(topic=topic, partition=record.partition,
                                                         offset=record.offset), request)
    finally:
        await consumer.stop()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for job_id in ids:
            location, request = found[job_id]
            state = JobState.pending(request).processing(location, runner=runner_of(job_id))
            await producer.send_and_wait(changelog_topic(settings), key=job_id.encode(), value=state.to_bytes(),
                                         partition=partition_for(job_id, settings.topic_partitions))
    finally:
        await producer.stop()


@pytest.mark.timeout(300)
async def test_orphans_are_resumed_once_their_worker_has_left_the_group(
        ferry_settings: Settings, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    api = await start_api(ferry_settings)
    try:
        # Submitted with no worker running: the requests wait in Kafka, as they would have when
        # the killed worker took them.
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(60)])
        still_running = set(ids[::3])  # their worker is still in the group
        await orphan_them(ferry_settings, ids, lambda job_id: ALIVE if job_id in still_running else GONE)

        members = {ALIVE}
        group_members = maintenance.group_members
        monkeypatch.setattr(maintenance, "group_members", lambda app: group_members(app) | members)
        async with worker_running(ferry_settings) as worker:
            reads = []
            fetch_values = worker.fetcher.fetch_values

            async def counting_fetch_values(*args, **kwargs):
                reads.append(args)
                return await fetch_values(*args, **kwargs)

            worker.fetcher.fetch_values = counting_fetch_values
            orphans = [job_id for job_id in ids if job_id not in still_running]

            def finished(job_ids) -> bool:
                return all((s := worker.get(j)) is not None and s.status is JobStatus.completed for j in job_ids)

            await wait_until(lambda: finished(orphans), 120, "the orphans to be resumed and finished")
            # The request stream delivered every request too: none of them was started from it.
            assert all(worker.get(j).status is JobStatus.processing for j in still_running)
            assert not set(calls_per_marker(fake_openai)) & {f"job-{ids.index(j)}" for j in still_running}
            # One read per partition holding orphans, not one per job.
            assert len(reads) <= ferry_settings.topic_partitions

            members.clear()  # the other worker leaves the group: its jobs are orphans now
            await wait_until(lambda: finished(ids), 120, "the other worker's jobs to be resumed")
            assert {worker.get(j).attempts for j in ids} == {2}
            assert worker.counters()["possible_duplicate_calls"] == len(ids)
    finally:
        await api.close()
    assert calls_per_marker(fake_openai) == {f"job-{i}": 1 for i in range(len(ids))}


@pytest.mark.timeout(300)
async def test_an_outcome_sent_across_a_rebalance_is_not_taken_for_an_orphan(
        ferry_settings: Settings, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outcome on its way through job events when a rebalance begins, and acknowledged by Kafka
    only after the new assignment looked at the events backlog, is in no backlog; its job, still
    ``processing`` under this worker and no longer in flight, must not be resumed (a second call)."""
    api = await start_api(ferry_settings)
    try:
        fake_openai.hold_answers()
        async with worker_running(ferry_settings) as worker:
            [job_id] = await submit_all(api, [job_body("job-0")])
            await wait_until(lambda: fake_openai.in_flight == 1, 60, "the job's call")
            # The outcome takes the job-events path (the partition reads as moving), and its send
            # waits until the rebalance below is over.
            send_gate, apply_gate = asyncio.Event(), asyncio.Event()
            send, write_report = worker.events.send, worker._write_report

            async def gated_send(*args, **kwargs):
                await send_gate.wait()
                return await send(*args, **kwargs)

            async def gated_write_report(event):  # the events agent applies it only when the test says
                await apply_gate.wait()
                return await write_report(event)

            monkeypatch.setattr(worker.events, "send", gated_send)
            monkeypatch.setattr(worker, "_write_report", gated_write_report)
            monkeypatch.setattr(worker, "owns", lambda partition: False)
            fake_openai.release_answers()
            await wait_until(lambda: job_id in worker._sending, 60, "the outcome's send to begin")
            monkeypatch.undo()  # owns, events.send and _write_report are the worker's own again
            monkeypatch.setattr(worker.events, "send", gated_send)
            monkeypatch.setattr(worker, "_write_report", gated_write_report)

            generation = worker.app.consumer_generation_id

            async def rejoin() -> None:  # a real rebalance: a new generation of the group
                worker.app.consumer._thread._ensure_consumer()._coordinator.request_rejoin()

            await worker.app.consumer._thread.call_thread(rejoin)
            await wait_until(lambda: worker.app.consumer_generation_id != generation and not worker.app.rebalancing
                             and worker._assignment_noted.is_set(), 120, "the rebalance to end")
            send_gate.set()
            await wait_until(lambda: job_id not in worker.runner.in_flight, 60, "the outcome to reach Kafka")
            assert worker.get(job_id).status is JobStatus.processing
            assert [state.id for state in worker.maintenance.orphans()] == []
            apply_gate.set()
            await wait_until(lambda: worker.get(job_id).status is JobStatus.completed, 60, "the outcome applied")
            assert worker.get(job_id).attempts == 1
    finally:
        await api.close()
    assert calls_per_marker(fake_openai) == {"job-0": 1}


@pytest.mark.timeout(300)
async def test_orphans_are_resumed_when_the_assignment_is_ready_not_at_the_next_timer_round(
        ferry_settings: Settings, fake_openai: FakeOpenAI) -> None:
    """The maintenance timer's first round is an hour away: the orphans of the worker's first
    assignment are resumed all the same, by the round run as the rebalance ends."""
    patient = ferry_settings.model_copy(update={"worker_maintenance_interval_seconds": 3600.0})
    api = await start_api(patient)
    try:
        ids = await submit_all(api, [job_body(f"job-{i}") for i in range(10)])
        await orphan_them(patient, ids, lambda job_id: GONE)
        async with worker_running(patient) as worker:
            await wait_until(lambda: all((s := worker.get(j)) is not None and s.status is JobStatus.completed
                                         for j in ids), 120, "the orphans to be resumed and finished")
            assert {worker.get(j).attempts for j in ids} == {2}
    finally:
        await api.close()
    assert calls_per_marker(fake_openai) == {f"job-{i}": 1 for i in range(10)}
