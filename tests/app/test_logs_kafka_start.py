"""A first start is quiet: the API and a worker, started as operators start them on a new broker
and fresh topics, log no ERROR from the Kafka clients while topics and leaders come up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp
import pytest

from app.settings import Settings
from deploy.fakes.openai_server import FakeOpenAI
from deploy.kafka.broker import LocalKafka
from deploy.processes import FerryProcess, free_port
from tests.helpers import CHAT, ferry_settings_for, wait_until

KAFKA_CLIENT_LOGGERS = ("aiokafka", "kafka", "faust", "mode")


def json_records(log_file: Path) -> list[dict]:
    """The process's output, every line of which is a JSON log record."""
    return [json.loads(line) for line in log_file.read_text().splitlines()]


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.timeout(300)
async def test_a_first_start_on_a_new_broker_logs_no_kafka_client_errors(
        private_broker: LocalKafka, settings: Settings, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    private_broker.start()
    own = ferry_settings_for(settings, fake_openai, kafka_bootstrap_servers=private_broker.bootstrap_servers)
    api_port = free_port()
    logging_env = {"FERRY_LOG_LEVEL": "INFO", "FERRY_LOG_FORMAT": "json"}
    # Started together, as `make run` does: each declares the topics the other may be asking for.
    api = FerryProcess("api", own, tmp_path / "api", FERRY_API_PORT=str(api_port), **logging_env).start()
    worker = FerryProcess("workers", own, tmp_path / "worker", **logging_env).start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: ready(session, f"http://127.0.0.1:{api_port}/health/ready"), 120,
                             "the API to be ready", interval=0.2)
            await wait_until(lambda: ready(session, f"http://127.0.0.1:{worker.web_port}/health/ready"), 120,
                             "the worker to be ready", interval=0.2)
            body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
            async with session.post(f"http://127.0.0.1:{api_port}{CHAT}", json=body) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]

            async def completed() -> bool:
                async with session.get(f"http://127.0.0.1:{api_port}{CHAT}/{job_id}") as response:
                    return response.status == 200 and (await response.json())["status"] == "completed"

            await wait_until(completed, 60, "the job to complete", interval=0.2)
    finally:
        for process in (api, worker):
            try:
                process.terminate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()

    api_records = json_records(tmp_path / "api" / "api.log")
    worker_records = json_records(tmp_path / "worker" / "workers.log")
    assert api_records and worker_records  # both processes log JSON lines
    records = api_records + worker_records
    kafka_errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL")
                    and r["logger"].split(".")[0] in KAFKA_CLIENT_LOGGERS]
    assert kafka_errors == []
