"""Ferry's Kafka topics: their names, their specification, declaring them and checking them.

All topics are keyed by job id and have ``Settings.topic_partitions`` partitions, so that a
job's request, its events and its table entry all sit in the same partition number: the
worker that owns partition *p* of one owns it of all (Faust co-partitioning), and the API's
pending record lands in the changelog partition the worker will later write.

- ``<prefix>-requests-<request_type>``: one per request type, written by the API;
- ``<prefix>-job-events``: outcomes, retry reports, resume and expiry orders, from the workers;
- ``<prefix>-dead-letter``: requests of jobs failed as poison, for inspection and replay;
- ``<app_id>-jobs-changelog``: the jobs table's compacted changelog (named by Faust's rule).

These are all the topics there are: Faust's leader-election topic (``<app_id>-__assignor-__leader``)
is switched off in ``workers/faust_layer/app.py`` (Ferry has no ``on_leader`` timer), and Faust creates
no other topic for Ferry's agents and table.

``topic_specs(settings)`` is the one description of them (partitions, replication, configs,
which process uses each): ``declare_topics`` creates what is missing from it when
``Settings.declare_topics`` is on, and every process checks the topics it uses against it at
start; the deployment manifests are made from, or checked against, the same function.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Literal

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.partitioner import murmur2

from app.jobs import RequestType
from app.kafka_clients import client_options
from app.retry import Backoff
from app.settings import Settings

log = logging.getLogger(__name__)

JOBS_TABLE = "jobs"
# Room for the largest accepted request or result plus its envelope.
MESSAGE_HEADROOM_BYTES = 1024 * 1024
# The processes, as named in TopicSpec.used_by and declare_topics.
Process = Literal["api", "worker"]
API: Process = "api"
WORKER: Process = "worker"
# How long the brokers may take to answer at start, and topics just created to show in their metadata.
CONNECT_TIMEOUT_SECONDS = 30.0
CREATED_VISIBLE_TIMEOUT_SECONDS = 30.0


def request_topic(settings: Settings, request_type: RequestType) -> str:
    return f"{settings.topic_prefix}-requests-{request_type.value}"


def request_topics(settings: Settings) -> list[str]:
    return [request_topic(settings, rt) for rt in RequestType]


def job_events_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}-job-events"


def dead_letter_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}-dead-letter"


def changelog_topic(settings: Settings) -> str:
    """Faust's name for a table's changelog: ``<app id>-<table>-changelog``."""
    return f"{settings.app_id}-{JOBS_TABLE}-changelog"


@functools.lru_cache(maxsize=65536)  # murmur2 is pure Python; a worker asks about a job several times
def partition_for(job_id: str, partitions: int) -> int:
    """The partition of a job in every Ferry topic: Kafka's default (murmur2) key hash.

    The API sends with this partition explicitly, and reads the changelog partition it names,
    so the mapping is written down once rather than left to each client's default.
    """
    hashed: int = murmur2(job_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions


def max_request_message_bytes(settings: Settings) -> int:
    """The largest request record: a JSON body, or a multipart form with its files in base64."""
    largest_upload = -(-settings.max_upload_bytes * 4 // 3)
    return max(settings.max_request_bytes, largest_upload) + MESSAGE_HEADROOM_BYTES


def max_state_message_bytes(settings: Settings) -> int:
    """The largest job state or job event: a stored result plus the job's envelope."""
    return settings.max_result_bytes + MESSAGE_HEADROOM_BYTES


def max_message_bytes(settings: Settings) -> int:
    """The largest record any Ferry topic holds: what producers and consumers must allow."""
    return max(max_request_message_bytes(settings), max_state_message_bytes(settings))


def longest_job_seconds(settings: Settings) -> float:
    """The longest a job can run: every worker allowed to start it using its whole deadline."""
    return settings.job_max_attempts * settings.job_deadline_seconds


def min_insync_replicas(replication_factor: int) -> int:
    """2 with three replicas or more: an acknowledged write (acks=all) is then on two brokers,
    and one broker can be down without stopping writes. Below three, 1: with 2 of 2 a single
    broker's restart would stop every write."""
    return 2 if replication_factor >= 3 else 1


def _durability_config(settings: Settings) -> dict[str, str]:
    return {"min.insync.replicas": str(min_insync_replicas(settings.topic_replication_factor))}


def request_topic_config(settings: Settings) -> dict[str, str]:
    # Retention: a resumed job reads its request again, at the offset its table entry records.
    return {**_durability_config(settings), "cleanup.policy": "delete",
            "retention.ms": str(settings.request_retention_seconds * 1000),
            "max.message.bytes": str(max_request_message_bytes(settings))}


def events_topic_config(settings: Settings) -> dict[str, str]:
    # An outcome in transit, or a resume order, must wait out the same outage a request must.
    return {**_durability_config(settings), "cleanup.policy": "delete",
            "retention.ms": str(settings.request_retention_seconds * 1000),
            "max.message.bytes": str(max_state_message_bytes(settings))}


def dead_letter_topic_config(settings: Settings) -> dict[str, str]:
    return {**_durability_config(settings), "cleanup.policy": "delete",
            "retention.ms": str(settings.dead_letter_retention_seconds * 1000),
            "max.message.bytes": str(max_request_message_bytes(settings))}


def changelog_topic_config(settings: Settings) -> dict[str, str]:
    # Compacted: the latest state of each job survives; a tombstone deletes an expired job.
    return {**_durability_config(settings), "cleanup.policy": "compact",
            "max.message.bytes": str(max_state_message_bytes(settings))}


@dataclass(frozen=True, eq=False)
class TopicSpec:
    """One topic as Ferry creates it: name, partitions, replication factor, the configs set on it,
    and the processes (``API``, ``WORKER``) that use it."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    used_by: frozenset[Process]


def topic_specs(settings: Settings) -> dict[str, TopicSpec]:
    """Every topic Ferry uses, by name, in the order: request topics, job events, dead letter,
    the jobs table's changelog.

    What ``declare_topics`` creates (with ``FERRY_DECLARE_TOPICS=true``) and what an operator
    creates otherwise; the start-up check holds existing topics to the partitions exactly and to
    what Ferry depends on in the configs (``topic_problems``), not to every value here.
    """
    def spec(name: str, configs: dict[str, str], *used_by: Process) -> TopicSpec:
        return TopicSpec(name, settings.topic_partitions, settings.topic_replication_factor, configs,
                         frozenset(used_by))

    specs = [spec(name, request_topic_config(settings), API, WORKER) for name in request_topics(settings)]
    specs.append(spec(job_events_topic(settings), events_topic_config(settings), WORKER))
    specs.append(spec(dead_letter_topic(settings), dead_letter_topic_config(settings), WORKER))
    # The API writes each job's pending record here and reads the table's state from it.
    specs.append(spec(changelog_topic(settings), changelog_topic_config(settings), API, WORKER))
    return {topic.name: topic for topic in specs}


@dataclass(frozen=True)
class ExistingTopic:
    """A topic as the brokers describe it."""

    partitions: int
    replication_factor: int
    configs: dict[str, str]


def topic_problems(settings: Settings, spec: TopicSpec, found: ExistingTopic) -> list[str]:
    """What in ``found``, the existing topic ``spec`` names, Ferry cannot work with, as phrases
    (empty: the topic is fine).

    Checked: the partition count exactly (co-partitioning, and the API computes partitions);
    the replication factor at least the configured one; the changelog compacted and only
    compacted (a deleting changelog loses the state of long-lived jobs); ``max.message.bytes``
    at least the largest record Ferry writes there; request and job-events retention longer than
    the longest job (a resumed job re-reads its request); ``min.insync.replicas`` no higher
    than the replicas (every acks=all write would fail) and 2 or more with three replicas.
    """
    problems = []
    if found.partitions != spec.partitions:
        problems.append(f"{found.partitions} partitions, needs exactly {spec.partitions} (FERRY_TOPIC_PARTITIONS)")
    if found.replication_factor < spec.replication_factor:
        problems.append(f"replication factor {found.replication_factor}, below "
                        f"FERRY_TOPIC_REPLICATION_FACTOR={spec.replication_factor}")
    configs = found.configs
    wanted_policy = spec.configs["cleanup.policy"]
    policy = configs.get("cleanup.policy", "delete")
    if wanted_policy == "compact" and policy != "compact":
        problems.append(f"cleanup.policy={policy}, needs compact (the jobs table keeps each job's latest state)")
    needed_bytes = int(spec.configs["max.message.bytes"])
    if int(configs.get("max.message.bytes", "0")) < needed_bytes:
        problems.append(f"max.message.bytes={configs.get('max.message.bytes')}, needs at least {needed_bytes}")
    if spec.name in request_topics(settings) or spec.name == job_events_topic(settings):
        retention_ms = int(configs.get("retention.ms", "-1"))
        if "delete" in policy and retention_ms != -1 and retention_ms <= longest_job_seconds(settings) * 1000:
            problems.append(f"retention.ms={retention_ms}, needs more than the longest job "
                            f"(job_max_attempts x job_deadline_seconds = {longest_job_seconds(settings):g} s)")
    min_isr = int(configs.get("min.insync.replicas", "1"))
    if min_isr > found.replication_factor:
        problems.append(f"min.insync.replicas={min_isr} above its {found.replication_factor} replicas "
                        f"(every acknowledged write would fail)")
    elif found.replication_factor >= 3 and min_isr < 2:
        problems.append(f"min.insync.replicas={min_isr} with {found.replication_factor} replicas, needs 2 "
                        f"(an acknowledged write must be on two brokers)")
    return problems


class TopicsNotReady(SystemExit):
    """The process cannot start: topics are missing or not as Ferry needs them (the message lists them)."""


async def _started_admin(settings: Settings) -> AIOKafkaAdminClient:
    """An admin client connected to the brokers, which may take up to ``CONNECT_TIMEOUT_SECONDS``
    to answer (a pod can start before Kafka does); then the process exits saying so."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_SECONDS
    backoff = Backoff(first=0.5, cap=5.0)
    while True:
        admin = AIOKafkaAdminClient(**client_options(settings))
        try:
            await admin.start()
            return admin
        except KafkaConnectionError as exc:
            await admin.close()
            delay = backoff.next_delay()
            if loop.time() + delay > deadline:
                raise TopicsNotReady(f"cannot check Ferry's Kafka topics: no broker answered within "
                                     f"{CONNECT_TIMEOUT_SECONDS:g} s ({exc})") from None
            await asyncio.sleep(delay)


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, ExistingTopic]:
    """The topics among ``names`` that exist, as the brokers describe them.

    A topic just created (by this process or another starting beside it) reaches each broker's
    metadata in turn: one broker may list it while the next one asked does not know it yet. Such
    a topic is left out, as if it did not exist yet (``_describe_until_visible`` asks again)."""
    # Only names the cluster lists are described: a metadata request for a missing topic
    # would create it on brokers that have auto.create.topics.enable on.
    existing = set(await admin.list_topics())
    present = [name for name in names if name in existing]
    if not present:
        return {}
    metadata = {d["topic"]: d for d in await admin.describe_topics(present)}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in present])
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for error_code, error_message, _type, name, entries, *_ in response.resources:
            if error_code == UnknownTopicOrPartitionError.errno:
                continue  # listed by one broker, not yet known to the one asked
            if error_code:
                raise TopicsNotReady(
                    f"cannot read the configs of topic {name}: {for_code(error_code).__name__} "
                    f"({error_message or 'no message'}); Ferry's Kafka user needs DescribeConfigs on its topics")
            configs[name] = {entry[0]: entry[1] for entry in entries}
    found = {}
    for name in present:
        if name not in configs or metadata[name]["error_code"]:
            continue
        partitions = metadata[name]["partitions"]
        replicas = len(partitions[0]["replicas"]) if partitions else 0
        found[name] = ExistingTopic(len(partitions), replicas, configs.get(name, {}))
    return found


async def _create(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    response = await admin.create_topics(
        [NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.configs) for spec in specs])
    failures = [f"{name}: {for_code(code).__name__} ({message or 'no message'})"
                for name, code, message, *_ in response.topic_errors
                if code not in (0, TopicAlreadyExistsError.errno)]
    if failures:
        raise TopicsNotReady("creating Kafka topics failed (FERRY_DECLARE_TOPICS=true needs the Create ACL; "
                             "or set it to false and create them as README \"Topics\" says): " + "; ".join(failures))
    log.info("declared %d topics", len(specs))


async def _describe_until_visible(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, ExistingTopic]:
    """``_describe`` after topics were created, asked again until every broker asked knows each
    one (the controller's metadata reaches the brokers a moment apart), or the time is up."""
    deadline = asyncio.get_running_loop().time() + CREATED_VISIBLE_TIMEOUT_SECONDS
    while True:
        found = await _describe(admin, names)
        if len(found) == len(names) or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.1)


async def declare_topics(settings: Settings, used_by: Process | None = None) -> None:
    """Make sure the topics a process uses are there as Ferry needs them, or exit saying what is not.

    ``used_by``: ``API`` or ``WORKER``, the topics that process uses; None, every topic.
    With ``settings.declare_topics`` the missing ones are created first, as ``topic_specs`` says;
    a topic that exists is never altered. Then every one is checked (``topic_problems``), and
    ``TopicsNotReady`` (a SystemExit) lists everything missing or different, in one message.
    """
    specs = [spec for spec in topic_specs(settings).values() if used_by is None or used_by in spec.used_by]
    admin = await _started_admin(settings)
    try:
        found = await _describe(admin, [spec.name for spec in specs])
        missing = [spec for spec in specs if spec.name not in found]
        if settings.declare_topics and missing:
            await _create(admin, missing)
            found = await _describe_until_visible(admin, [spec.name for spec in specs])
    except KafkaError as exc:
        raise TopicsNotReady(f"checking Ferry's Kafka topics failed: {type(exc).__name__}: {exc}") from None
    finally:
        await admin.close()
    absent = [spec.name for spec in specs if spec.name not in found]
    different = [f"{spec.name}: {', '.join(problems)}" for spec in specs if spec.name in found
                 if (problems := topic_problems(settings, spec, found[spec.name]))]
    if not absent and not different:
        log.info("%d topics checked: as Ferry needs them", len(specs))
        return
    listed = ([f"missing (or not visible to Ferry's Kafka user): {', '.join(absent)}"] if absent else []) + different
    remedy = ("Ferry does not alter existing topics: fix them, or delete them to have them created again"
              if settings.declare_topics else
              "FERRY_DECLARE_TOPICS=false: the operator creates them, as app/topics.py topic_specs() and "
              "README \"Topics\" describe")
    raise TopicsNotReady(f"Kafka topics are not as Ferry needs them. {'; '.join(listed)}. {remedy}.")
