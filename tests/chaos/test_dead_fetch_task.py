"""A consumer whose background fetch task dies (an exception aiokafka does not expect ends it, and
every ``getmany`` after returns nothing) must not leave its process answering ready while it reads
nothing: the worker exits, to be restarted, and loses no job; the API's read model and the
worker's request fetcher replace the consumer and read on. The fault is injected into aiokafka's
fetch task (tests/chaos/fetch_faults.py); the broker is real."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from app.settings import Settings
from deploy.fakes.openai_server import FakeOpenAI
from deploy.processes import FerryProcess
from tests.chaos.fetch_faults import FetchFaults
from tests.helpers import (
    ferry_settings_for,
    job_body,
    poll_until_done,
    start_api,
    submit,
    submit_all,
    terminal_count,
    wait_until,
    worker_ready,
    worker_running,
)
from tests.workers.faust_repro import create_topic, produce
from workers.request_fetcher import RequestFetcher, retried_while_unreachable

READ_MODEL_CLIENT = "ferry-api-read-model"
REQUEST_FETCHER_CLIENT = "ferry-worker-request-fetcher"


@pytest.fixture
async def own_api(settings: Settings, fake_openai: FakeOpenAI) -> TestClient:
    api = await start_api(ferry_settings_for(settings, fake_openai))
    yield api
    await api.close()


@pytest.mark.timeout(300)
async def test_a_worker_whose_fetch_task_dies_exits_and_loses_no_job(settings: Settings, fake_openai: FakeOpenAI,
                                                                    own_api: TestClient, tmp_path: Path) -> None:
    own = ferry_settings_for(settings, fake_openai)
    trigger = tmp_path / "fail-fetches"
    faulty = FerryProcess("tests.chaos.fetch_faults", own, tmp_path / "faulty", str(trigger)).start()
    replacement = FerryProcess("workers", own, tmp_path / "replacement")
    try:
        await worker_ready(faulty, "first")
        before = await submit_all(own_api, [job_body(f"before-{n}") for n in range(5)])
        await wait_until(lambda: terminal_count(own_api, before) == 5, 60, "the jobs before the fault")

        trigger.touch()
        after = await submit_all(own_api, [job_body(f"after-{n}") for n in range(20)])
        # Without the watch the worker went on answering ready, fetching nothing, for ever.
        await wait_until(lambda: faulty.process.poll() is not None, 60, "the worker to exit")
        assert faulty.process.returncode != 0
        log = (tmp_path / "faulty" / "tests.chaos.fetch_faults.log").read_text()
        assert "the Kafka fetch task has died (InjectedFetchFault(" in log

        replacement.start()
        await worker_ready(replacement, "replacement")
        await wait_until(lambda: terminal_count(own_api, after) == 20, 120, "every job accepted after the fault")
    finally:
        faulty.kill()
        replacement.kill()
    for job_id in before + after:
        assert (await poll_until_done(own_api, job_id))["status"] == "completed"


@pytest.mark.timeout(300)
async def test_the_api_replaces_a_read_model_consumer_whose_fetch_task_died(
        settings: Settings, fake_openai: FakeOpenAI, own_api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = FetchFaults().install(monkeypatch)
    own = ferry_settings_for(settings, fake_openai)
    async with worker_running(own):
        first = await submit(own_api, job_body("first"))
        assert (await poll_until_done(own_api, first["id"]))["status"] == "completed"

        faults.arm(READ_MODEL_CLIENT)
        await wait_until(lambda: faults.fired[READ_MODEL_CLIENT] == 1, 30, "the read model's fetch task to die")
        # Its own pending write the API knows at once; the outcome comes only through a consumer.
        second = await submit(own_api, job_body("second"))
        assert (await poll_until_done(own_api, second["id"]))["status"] == "completed"
        assert (await poll_until_done(own_api, first["id"]))["status"] == "completed"
        await wait_until(lambda: _answers_ready(own_api), 30, "the API to answer ready again")


async def _answers_ready(api: TestClient) -> bool:
    return (await api.get("/health/ready")).status == 200


@pytest.mark.timeout(300)
async def test_the_request_fetcher_replaces_a_consumer_whose_fetch_task_died(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = FetchFaults().install(monkeypatch)
    bootstrap, topic = settings.require_bootstrap_servers(), f"{settings.topic_prefix}-requests"
    await create_topic(bootstrap, topic, 1)
    await produce(bootstrap, topic, {0: [(None, b"request-%d" % n) for n in range(10)]})
    fetcher = RequestFetcher(settings)
    try:
        assert await fetcher.fetch_values(topic, 0, 0, 5) == [(n, b"request-%d" % n) for n in range(5)]
        faults.arm(REQUEST_FETCHER_CLIENT)
        # Without the watch each read waited out its 30 s for records that never came, retried for ever.
        read = retried_while_unreachable(fetcher.fetch_values, topic, 0, 5, 10, stopping=lambda: False)
        assert await asyncio.wait_for(read, 60) == [(n, b"request-%d" % n) for n in range(5, 10)]
        assert faults.fired[REQUEST_FETCHER_CLIENT] == 1
    finally:
        await fetcher.stop()
