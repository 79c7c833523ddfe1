"""The worker's Faust app: one factory, and the few facts of Faust's state the worker reads."""

from __future__ import annotations

import os
from typing import Any, cast

import faust
from faust.types import TP
from faust.web import drivers as web_drivers
from faust.web.drivers.aiohttp import Web as AiohttpWeb

from app.kafka_clients import faust_broker_options
from app.settings import Settings
from app.topics import max_message_bytes
from workers.faust_layer.recovery import FerryTableManager


class PagesOnlyWeb(AiohttpWeb):
    """Faust's aiohttp web server without Faust's own views (``/table/<name>/<key>/`` would serve
    any job's state, ``/router/`` every worker's address): only the pages the worker registers."""

    default_blueprints = production_blueprints = debug_blueprints = optional_blueprints = ()


# Faust picks its web server class by the ``web`` setting's URL scheme, from this registry.
web_drivers.DRIVERS.aliases["ferry-pages"] = f"{__name__}:PagesOnlyWeb"


def create_app(settings: Settings, **overrides) -> faust.App:
    """A Faust app for ``settings``; ``overrides`` are passed to ``faust.App`` (tests use it)."""
    os.makedirs(settings.worker_data_dir, exist_ok=True)  # Faust creates only the last level
    options = dict(
        # Faust reads ~80 variables of its own (WEB_BIND, BROKER_URL...) from the environment, and
        # they win over the values given here: Ferry's settings are the only configuration.
        env={},
        broker=[f"kafka://{s.strip()}" for s in settings.require_bootstrap_servers().split(",") if s.strip()],
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        # Ferry's topics are declared or checked by app/topics.py before Faust starts.
        topic_allow_declare=settings.declare_topics,
        topic_disable_leader=True,  # no leader topic: Ferry has no on_leader timers
        web="ferry-pages://", web_port=settings.worker_web_port, web_bind=settings.worker_web_host,
        autodiscover=False, datadir=os.path.join(settings.worker_data_dir, "{conf.name}-data"),
        # Ferry's recovery runs the store-ahead-of-changelog check itself (Faust's races a standby).
        TableManager=FerryTableManager, recovery_consistency_check=False,
        broker_commit_interval=1.0,  # after a crash, less is taken again than Faust's 2.8 s leaves
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_heartbeat_interval=settings.kafka_session_timeout_seconds / 4,
        # Multipart requests carry their files, speech results their audio: records up to the
        # topics' max.message.bytes.
        producer_max_request_size=max_message_bytes(settings),
        **faust_broker_options(settings),
    )
    options.update(overrides)
    return faust.App(settings.app_id, **options)


def owned_partitions(app: faust.App, topic: str) -> set[int]:
    """The partitions of ``topic`` assigned to this worker as active (not standby)."""
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


def group_members(app: faust.App) -> set[str]:
    """The ``canonical_url`` of every worker in the group at the last rebalance, this one included.

    Faust hands each member the whole group's table distribution, keyed by member URL; a worker
    that died is absent once the group has noticed (its session timeout)."""
    return set(cast(Any, app.assignor).changelog_distribution)


def recovered(app: faust.App) -> bool:
    """Whether the table has been recovered for the current assignment."""
    return bool(cast(Any, app.tables).recovery.completed.is_set())


def uncommitted_requests(app: faust.App, topics: set[str]) -> dict[str, int]:
    """Per topic of ``topics``: records of this worker's partitions past the group's commit, as
    of the consumer's last fetch (from memory: a scrape costs no Kafka request)."""
    consumer = cast(Any, app.consumer)  # Faust keeps the group's commits in a private mapping
    committed: dict[TP, int | None] = consumer._committed_offset
    ends = app.monitor.tp_end_offsets
    mine = [tp for tp in consumer.assignment() if tp.topic in topics and tp in ends]
    return {topic: sum(max(0, ends[tp] - (committed.get(tp) or 0)) for tp in mine if tp.topic == topic)
            for topic in {tp.topic for tp in mine}}
