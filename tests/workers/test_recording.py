"""Where a call's outcome is recorded: in the table by the worker that owns the job's partition,
or through the job-events topic when the partition is not (or no longer) this worker's."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from app.jobs import JobEvent
from app.topics import job_events_topic, partition_for
from tests.helpers import poll_until_done, submit
from workers.app import FerryWorker

BODY = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def job_events_of(worker: FerryWorker, job_id: str) -> list[JobEvent]:
    tp = TopicPartition(job_events_topic(worker.settings), partition_for(job_id, worker.settings.topic_partitions))
    end = (await worker.fetcher.end_offsets([tp]))[tp]
    records = await worker.fetcher.fetch_values(tp.topic, tp.partition, 0, end) if end else []
    return [event for event in (JobEvent.from_bytes(value) for _, value in records) if event.id == job_id]


@pytest.mark.timeout(240)
async def test_the_owner_writes_the_outcome_to_the_table_without_a_job_event(api, worker: FerryWorker) -> None:
    job_id = (await submit(api, BODY))["id"]
    assert (await poll_until_done(api, job_id))["status"] == "completed"
    assert await job_events_of(worker, job_id) == []


@pytest.mark.timeout(240)
async def test_an_outcome_for_a_partition_not_owned_goes_through_job_events(api, worker: FerryWorker) -> None:
    # As after a rebalance that moved the partition during the call: the outcome is sent to the
    # job-events topic, and the partition's owner (here the same worker's events agent) applies it.
    worker.owns = lambda partition: False
    job_id = (await submit(api, BODY))["id"]
    job = await poll_until_done(api, job_id)
    assert job["status"] == "completed" and job["result"]["choices"][0]["message"]["content"]
    assert [e.kind for e in await job_events_of(worker, job_id)] == ["outcome"]
    assert worker.counters()["duplicate_outcomes"] == 0
    assert job_id not in worker.runner.in_flight
