"""The worker's jobs table: placed by Ferry's partition rule, kept in RocksDB, recovered from
its changelog by a worker that has none of its files, written to Kafka in order without Faust's
producer buffer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from app.jobs import JobStatus
from app.settings import Settings
from app.topics import partition_for
from tests.helpers import submit, wait_until, worker_running
from workers.app import FerryWorker
from workers.faust_layer import JobStore, owned_partitions

BODY = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_the_table_puts_each_job_where_the_api_and_the_request_topics_do(settings: Settings) -> None:
    table = FerryWorker(settings, web_enabled=False).table
    ids = [f"job-{n}" for n in range(200)]
    assert [table.partition_for_key(i.encode()) for i in ids] == [partition_for(i, settings.topic_partitions)
                                                                   for i in ids]
    assert len({table.partition_for_key(i.encode()) for i in ids}) == settings.topic_partitions


@pytest.mark.timeout(300)
async def test_a_worker_without_the_files_recovers_the_table_from_its_changelog(api, ferry_settings: Settings,
                                                                                tmp_path: Path) -> None:
    async with worker_running(ferry_settings) as first:
        assert isinstance(first.table.data, JobStore)
        ids = [(await submit(api, BODY))["id"] for _ in range(20)]

        def all_completed() -> bool:
            return all((state := first.get(i)) is not None and state.status is JobStatus.completed for i in ids)

        await wait_until(all_completed, 60, "the jobs to complete")
    assert any(Path(ferry_settings.worker_data_dir).rglob("*.sst")) or any(
        Path(ferry_settings.worker_data_dir).rglob("*.log")), "RocksDB files in the worker's data dir"

    elsewhere = ferry_settings.model_copy(update={"worker_data_dir": str(tmp_path / "another-worker")})
    async with worker_running(elsewhere) as second:
        await wait_until(lambda: all(second.get(i) is not None for i in ids), 60, "the table to be recovered")
        recovered = [second.get(i) for i in ids]
        assert {state.status for state in recovered} == {JobStatus.completed}
        assert all(state.result["choices"][0]["message"]["content"] for state in recovered)
        assert second.get("not-a-job") is None


@pytest.mark.timeout(120)
async def test_table_writes_skip_fausts_producer_buffer_and_reach_kafka_in_order(worker: FerryWorker,
                                                                                 kafka_bootstrap: str) -> None:
    partitions = worker.settings.topic_partitions
    changelog = worker.table.changelog_topic.get_topic_name()
    await wait_until(lambda: len(owned_partitions(worker.app, changelog)) == partitions, 60, "the worker's assignment")
    keys = [f"ordered-{n}".encode() for n in range(5)]
    versions = 300
    writes = []
    for version in range(versions):  # 1,500 writes in one step of the loop, as a catch-up makes
        for key in keys:
            writes.append(worker.table.write(key, str(version).encode()))
    # Faust holds back every stream while more than 100 writes wait in its producer buffer.
    assert worker.app.producer.buffer.size == 0
    assert await worker.table.flush_writes(timeout=60)  # what a rebalance waits for
    assert all(write.done() and write.exception() is None for write in writes)

    seen: dict[bytes, list[bytes]] = {key: [] for key in keys}
    consumer = AIOKafkaConsumer(worker.table.changelog_topic.get_topic_name(), bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while sum(map(len, seen.values())) < len(keys) * versions:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        if record.key in seen:
                            seen[record.key].append(record.value)
    finally:
        await consumer.stop()
    assert all(values == [str(v).encode() for v in range(versions)] for values in seen.values())
    assert all(worker.table.data.get(key) == str(versions - 1).encode() for key in keys)
