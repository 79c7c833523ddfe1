"""Topic declaration and the start-up check, on the real broker: with declaration off nothing is
created and every missing topic is named; wrong topics are named, never altered; declared topics
carry the specified partitions and configs."""

from __future__ import annotations

import asyncio
import functools
import socket

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from pydantic import ValidationError

from app.jobs import RequestType
from app.kafka_clients import client_options
from app.settings import Settings
from app.topics import (
    API,
    WORKER,
    ExistingTopic,
    TopicsNotReady,
    changelog_topic,
    dead_letter_topic,
    declare_topics,
    job_events_topic,
    request_topic,
    request_topics,
    topic_problems,
    topic_specs,
)
from tests.helpers import prefixes, topics_named, wait_until, with_values


async def create(settings: Settings, topics: list[NewTopic]) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        response = await admin.create_topics(topics)
        assert all(code == 0 for _, code, *_ in response.topic_errors), response.topic_errors

        # The broker lists a topic a moment after its controller created it.
        async def listed() -> bool:
            return {topic.name for topic in topics} <= set(await admin.list_topics())

        await wait_until(listed, 30, "the created topics to be listed")
    finally:
        await admin.close()


async def described(settings: Settings, names: list[str]) -> dict[str, tuple[int, int, dict[str, str]]]:
    """Per topic: partitions, replication factor, configs, as the broker describes them."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        metadata = {d["topic"]: d for d in await admin.describe_topics(names)}
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        configs = {resource[3]: {entry[0]: entry[1] for entry in resource[4]} for resource in response.resources}
    finally:
        await admin.close()
    return {name: (len(metadata[name]["partitions"]), len(metadata[name]["partitions"][0]["replicas"]),
                   configs[name]) for name in names}


async def test_declaration_off_names_every_missing_topic_and_creates_none(settings: Settings) -> None:
    off = with_values(settings, declare_topics=False)
    before = await topics_named(off, *prefixes(off))

    with pytest.raises(TopicsNotReady) as refused:
        await declare_topics(off)

    message = str(refused.value)
    for name in topic_specs(off):
        assert name in message
    # Faust's own: the table's changelog (its leader topic is switched off, see workers/faust_layer/app.py).
    assert changelog_topic(off) == f"{off.app_id}-jobs-changelog" and changelog_topic(off) in message
    assert "__assignor" not in message
    assert "FERRY_DECLARE_TOPICS=false" in message
    assert await topics_named(off, *prefixes(off)) == before == set()


async def test_each_process_checks_the_topics_it_uses(settings: Settings) -> None:
    off = with_values(settings, declare_topics=False)
    with pytest.raises(TopicsNotReady) as api_refused:
        await declare_topics(off, used_by=API)
    with pytest.raises(TopicsNotReady) as worker_refused:
        await declare_topics(off, used_by=WORKER)

    assert job_events_topic(off) not in str(api_refused.value)
    assert dead_letter_topic(off) not in str(api_refused.value)
    for name in [*request_topics(off), changelog_topic(off)]:
        assert name in str(api_refused.value)
    for name in topic_specs(off):
        assert name in str(worker_refused.value)


async def test_every_difference_is_named_and_nothing_is_altered(settings: Settings) -> None:
    specs = topic_specs(settings)
    chat = request_topic(settings, RequestType.chat_completion)
    embedding = request_topic(settings, RequestType.embedding)
    wrong = {
        chat: NewTopic(chat, 2, 1, topic_configs=specs[chat].configs),
        embedding: NewTopic(embedding, 4, 1, topic_configs=specs[embedding].configs | {"retention.ms": "60000"}),
        job_events_topic(settings): NewTopic(job_events_topic(settings), 4, 1,
                                             topic_configs=specs[job_events_topic(settings)].configs
                                             | {"max.message.bytes": "1048588"}),
        changelog_topic(settings): NewTopic(changelog_topic(settings), 4, 1,
                                            topic_configs=specs[changelog_topic(settings)].configs
                                            | {"cleanup.policy": "delete"}),
    }
    await create(settings, [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.configs)
                            for s in specs.values() if s.name not in wrong] + list(wrong.values()))

    for declaring in (False, True):
        with pytest.raises(TopicsNotReady) as refused:
            await declare_topics(with_values(settings, declare_topics=declaring))
        message = str(refused.value)
        assert f"{chat}: 2 partitions, needs exactly 4" in message
        assert f"{embedding}: retention.ms=60000, needs more than the longest job" in message
        assert f"{job_events_topic(settings)}: max.message.bytes=1048588, needs at least" in message
        assert f"{changelog_topic(settings)}: cleanup.policy=delete, needs compact" in message
        assert "missing" not in message
        # Only the four wrong topics are named.
        assert sum(f"{name}:" in message for name in specs) == 4

    # Declaration on did not touch them.
    now = await described(settings, list(wrong))
    assert now[chat][0] == 2
    assert now[embedding][2]["retention.ms"] == "60000"
    assert now[changelog_topic(settings)][2]["cleanup.policy"] == "delete"


async def test_declaration_creates_every_topic_as_specified(settings: Settings) -> None:
    await declare_topics(settings)

    specs = topic_specs(settings)
    assert await topics_named(settings, *prefixes(settings)) == set(specs)
    found = await described(settings, list(specs))
    for name, spec in specs.items():
        partitions, replicas, configs = found[name]
        assert (partitions, replicas) == (settings.topic_partitions, settings.topic_replication_factor)
        assert {key: configs[key] for key in spec.configs} == spec.configs, name
    week, fortnight = str(7 * 24 * 3600 * 1000), str(14 * 24 * 3600 * 1000)
    assert found[request_topic(settings, RequestType.chat_completion)][2]["retention.ms"] == week
    assert found[job_events_topic(settings)][2]["retention.ms"] == week
    assert found[dead_letter_topic(settings)][2]["retention.ms"] == fortnight
    assert found[changelog_topic(settings)][2]["cleanup.policy"] == "compact"
    assert {configs["min.insync.replicas"] for _, _, configs in found.values()} == {"1"}
    # And the check passes on what was created, declaration on or off.
    await declare_topics(settings)
    await declare_topics(with_values(settings, declare_topics=False))


def test_min_insync_replicas_follows_the_replication_factor() -> None:
    def min_isr(replication: int) -> set[str]:
        specs = topic_specs(Settings(topic_replication_factor=replication))
        return {spec.configs["min.insync.replicas"] for spec in specs.values()}

    assert min_isr(1) == min_isr(2) == {"1"}
    assert min_isr(3) == min_isr(5) == {"2"}


def test_min_insync_replicas_is_checked_against_the_replicas() -> None:
    settings = Settings()
    spec = topic_specs(settings)[changelog_topic(settings)]
    configs = dict(spec.configs)
    assert topic_problems(settings, spec, ExistingTopic(8, 3, configs | {"min.insync.replicas": "1"})) == [
        "min.insync.replicas=1 with 3 replicas, needs 2 (an acknowledged write must be on two brokers)"]
    assert topic_problems(settings, spec, ExistingTopic(8, 1, configs | {"min.insync.replicas": "2"})) == [
        "min.insync.replicas=2 above its 1 replicas (every acknowledged write would fail)"]
    assert topic_problems(settings, spec, ExistingTopic(8, 3, configs | {"min.insync.replicas": "2"})) == []


def test_request_retention_must_outlive_the_longest_job() -> None:
    with pytest.raises(ValidationError, match="request_retention_seconds=5400 must exceed"):
        Settings(job_max_attempts=3, job_deadline_seconds=1800, request_retention_seconds=5400)
    Settings(job_max_attempts=3, job_deadline_seconds=1800, request_retention_seconds=5401)
    assert Settings().request_retention_seconds == 7 * 24 * 3600
    assert Settings().dead_letter_retention_seconds == 14 * 24 * 3600


async def test_brokers_that_never_answer_end_the_check_with_one_message(monkeypatch, unique_id) -> None:
    monkeypatch.setattr("app.topics.CONNECT_TIMEOUT_SECONDS", 1.0)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        with pytest.raises(TopicsNotReady, match=r"cannot check Ferry's Kafka topics: no broker answered within 1 s"):
            await declare_topics(Settings(kafka_bootstrap_servers=address, topic_prefix=unique_id))


async def test_two_processes_starting_at_once_on_a_cluster_both_see_the_topics(cluster_settings: Settings) -> None:
    """On three brokers a topic just created reaches each broker's metadata a moment apart: the
    API and a worker starting side by side, each creating and then checking, once failed the
    check ("missing", or a config read answered UnknownTopicOrPartition by the broker asked)."""
    for round_number in range(4):  # fresh topics each round: the race is at creation
        own = cluster_settings.model_copy(update={"topic_prefix": f"{cluster_settings.topic_prefix}-{round_number}",
                                                  "app_id": f"{cluster_settings.app_id}-{round_number}"})
        await asyncio.gather(declare_topics(own, API), declare_topics(own, WORKER))
        # Both checks passed. The broker a new client happens to ask may still be catching up (CI
        # once saw one list none of them at once): the topics must reach it, not be there already.
        await wait_until(functools.partial(all_listed, own), 30, f"round {round_number}'s topics listed")


async def all_listed(settings: Settings) -> bool:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        return set(topic_specs(settings)) <= set(await admin.list_topics())
    finally:
        await admin.close()
