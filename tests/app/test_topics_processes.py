"""Topics owned by the operator, seen from the processes: with declaration off, the API and the
worker stop at start with the list of missing topics, Faust declares nothing, and on topics the
operator created a job runs end to end without any topic being created."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from app.settings import Settings
from app.topics import declare_topics, topic_specs
from deploy.processes import free_port
from tests.helpers import (
    ferry_settings_for,
    poll_until_done,
    prefixes,
    start_api,
    submit,
    topics_named,
    with_values,
    worker_running,
)
from workers.app import FerryWorker

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
async def test_worker_with_declaration_off_runs_a_job_on_topics_the_operator_made(settings, fake_openai) -> None:
    await declare_topics(settings)  # the operator's part: every topic of topic_specs
    off = ferry_settings_for(settings, fake_openai, declare_topics=False)
    made_by_operator = await topics_named(off, *prefixes(off))
    assert made_by_operator == set(topic_specs(off))

    api = await start_api(off)
    try:
        async with worker_running(off) as worker:
            accepted = await submit(api, {"model": "openai/gpt-4o-mini",
                                          "messages": [{"role": "user", "content": "hello"}]})
            job = await poll_until_done(api, accepted["id"])
            assert job["status"] == "completed"
            # Every topic Faust knows at run time (agents', table's, its own) is one of Ferry's.
            faust_topics = {name for channel in worker.app.topics for name in channel.topics}
            assert worker.table.changelog_topic.get_topic_name() in faust_topics
            assert faust_topics <= set(topic_specs(off))
    finally:
        await api.close()

    assert await topics_named(off, *prefixes(off)) == made_by_operator


async def test_faust_declares_nothing_with_declaration_off(settings) -> None:
    off = with_values(settings, declare_topics=False)
    worker = FerryWorker(off, web_enabled=False)
    # What Faust declares as it starts: its table's changelog and the topics of its agents.
    for channel in (worker.table.changelog_topic, worker.requests, worker.events, worker.dead_letters):
        await channel.maybe_declare()
    if worker.app.producer.started:  # only if it declared something
        await worker.app.producer.stop()

    assert await topics_named(off, *prefixes(off)) == set()


async def run_process(module: str, settings: Settings, tmp_path: Path) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FERRY_", "KAFKA_"))}
    env |= {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "FERRY_APP_ID": settings.app_id,
        "FERRY_TOPIC_PREFIX": settings.topic_prefix,
        "FERRY_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "FERRY_DECLARE_TOPICS": "false",
        "FERRY_API_PORT": "0",
        "FERRY_WORKER_WEB_PORT": str(free_port()),
        "FERRY_WORKER_DATA_DIR": str(tmp_path / module),
    }
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", module, cwd=ROOT, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, stderr.decode()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("module", ["api", "workers"])
async def test_process_with_declaration_off_exits_listing_the_missing_topics(settings, tmp_path, module) -> None:
    returncode, stderr = await run_process(module, settings, tmp_path)

    assert returncode == 1
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "Kafka topics are not as Ferry needs them" in line]
    uses = "api" if module == "api" else "worker"
    for name, spec in topic_specs(settings).items():
        assert (name in line) == (uses in spec.used_by), name
    assert await topics_named(settings, *prefixes(settings)) == set()
