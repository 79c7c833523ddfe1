"""Faust against the real broker: an agent writes a table, which survives a restart from its
compacted changelog."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from faust.contrib.asgi import faust_app_running

from app.settings import Settings
from workers.faust_layer import create_app


def _build(settings: Settings):
    app = create_app(settings, web_enabled=False)
    counts = app.Table("counts", default=int, partitions=settings.topic_partitions)
    # internal=True: the app declares the topic itself (the broker does not auto-create).
    events = app.topic(f"{settings.topic_prefix}-events", key_type=str, value_type=str,
                       partitions=settings.topic_partitions, internal=True)

    @app.agent(events)
    async def count(stream):
        async for word, _ in stream.items():
            counts[word] += 1

    return app, counts, events


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [(_, _, _, _, entries)] = response.resources
    return {entry[0]: entry[1] for entry in entries}


@pytest.mark.timeout(180)
async def test_agent_writes_table_and_table_recovers_from_changelog(settings: Settings) -> None:
    expected = {"apple": 3, "pear": 2, "fig": 1}

    app, counts, events = _build(settings)
    async with faust_app_running(app, stop_timeout=60):
        for word, times in expected.items():
            for _ in range(times):
                await events.send(key=word, value=word)
        await _wait_for(lambda: {w: counts[w] for w in expected} == expected, 60, "the agent to count")

    # A new app with the same id and no local state: the table comes back from the changelog.
    app2, counts2, _ = _build(settings)
    async with faust_app_running(app2, stop_timeout=60):
        await _wait_for(lambda: dict(counts2.items()) == expected, 60, "the table to recover")

    config = await _topic_config(settings.kafka_bootstrap_servers, counts.changelog_topic.get_topic_name())
    assert config["cleanup.policy"] == "compact"
