"""The worker's jobs table: placed by Ferry's partition rule, kept in RocksDB, recovered from
its changelog by a worker that has none of its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.jobs import JobStatus
from app.settings import Settings
from app.topics import partition_for
from tests.conftest import wait_until, worker_running
from tests.e2e.test_chat import submit
from workers.app import FerryWorker
from workers.jobs_table import JobStore

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
