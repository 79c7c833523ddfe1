"""Ferry's Kafka topics: their names, their configuration, and declaring them.

All topics are keyed by job id and have ``Settings.topic_partitions`` partitions, so that a
job's request, its events and its table entry all sit in the same partition number: the
worker that owns partition *p* of one owns it of all (Faust co-partitioning), and the API's
pending record lands in the changelog partition the worker will later write.

- ``<prefix>-requests-<request_type>``: one per request type, written by the API;
- ``<prefix>-job-events``: outcomes, retry reports, resume and expiry orders, from the workers;
- ``<prefix>-dead-letter``: requests of jobs failed as poison, for inspection and replay;
- ``<app_id>-jobs-changelog``: the jobs table's compacted changelog (named by Faust's rule).
"""

from __future__ import annotations

import functools
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from app.jobs import RequestType
from app.settings import Settings

log = logging.getLogger(__name__)

JOBS_TABLE = "jobs"
# Room for the largest accepted request or result plus its envelope.
MESSAGE_HEADROOM_BYTES = 1024 * 1024


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
    return (murmur2(job_id.encode()) & 0x7FFFFFFF) % partitions


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


def request_topic_config(settings: Settings) -> dict[str, str]:
    return {"max.message.bytes": str(max_request_message_bytes(settings))}


def events_topic_config(settings: Settings) -> dict[str, str]:
    return {"max.message.bytes": str(max_state_message_bytes(settings))}


def changelog_topic_config(settings: Settings) -> dict[str, str]:
    # Compacted: the latest state of each job survives; a tombstone deletes an expired job.
    return {"cleanup.policy": "compact", "max.message.bytes": str(max_state_message_bytes(settings))}


async def declare_topics(settings: Settings) -> None:
    """Create every topic Ferry uses, if missing, and check that all have the configured
    partition count (co-partitioning depends on it). Safe to call from every process at start."""
    wanted = [NewTopic(name, settings.topic_partitions, settings.topic_replication_factor,
                       topic_configs=request_topic_config(settings))
              for name in [*request_topics(settings), dead_letter_topic(settings)]]
    wanted.append(NewTopic(job_events_topic(settings), settings.topic_partitions,
                           settings.topic_replication_factor, topic_configs=events_topic_config(settings)))
    wanted.append(NewTopic(changelog_topic(settings), settings.topic_partitions,
                           settings.topic_replication_factor, topic_configs=changelog_topic_config(settings)))
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.require_bootstrap_servers())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [topic for topic in wanted if topic.name not in existing]
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"creating topic {name} failed with Kafka error code {code}")
            log.info("declared %d topics", len(missing))
        # Topics created just now have the right count; ones that existed may not.
        described = await admin.describe_topics([topic.name for topic in wanted if topic.name in existing])
        wrong = {d["topic"]: len(d["partitions"]) for d in described
                 if len(d["partitions"]) != settings.topic_partitions}
        if wrong:
            raise RuntimeError(f"topics with a partition count other than FERRY_TOPIC_PARTITIONS="
                               f"{settings.topic_partitions}: {wrong}")
    finally:
        await admin.close()
