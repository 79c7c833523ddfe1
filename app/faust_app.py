"""The Faust app: one factory, so the worker, the tests and the tools configure it alike."""

from __future__ import annotations

import os
from typing import Any

import faust
from faust.web import drivers as web_drivers
from faust.web.drivers.aiohttp import Web as AiohttpWeb

from app.kafka_clients import faust_broker_options
from app.settings import Settings
from app.topics import max_message_bytes


class PagesOnlyWeb(AiohttpWeb):
    """Faust's aiohttp web server without any of Faust's own views.

    Faust serves ``/table/<name>/<key>/`` (any job's full state: its result and owner),
    ``/router/`` (every worker's address), ``/`` and, with ``debug``, ``/graph/``, ``/stats``
    and ``/assignment/``; ``/performance/`` when enabled. The worker serves only the pages it
    registers with ``app.page`` (its health checks); any other path is 404.
    """

    default_blueprints = ()
    production_blueprints = ()
    debug_blueprints = ()
    optional_blueprints = ()


# Faust picks its web server class by the ``web`` setting's URL scheme, from this registry.
web_drivers.DRIVERS.aliases["ferry-pages"] = f"{__name__}:PagesOnlyWeb"


def broker_urls(bootstrap_servers: str) -> list[str]:
    """``host:port,host:port`` in the form Faust takes (``kafka://host:port`` each)."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()]


def create_app(settings: Settings, **overrides: Any) -> faust.App:
    """A Faust app for ``settings``; ``overrides`` are passed to ``faust.App`` (tests use it)."""
    os.makedirs(settings.worker_data_dir, exist_ok=True)  # Faust creates only the last level
    options = dict(
        # Faust reads ~80 variables of its own (WEB_BIND, APP_WEB_TABLES_ENABLED, BROKER_URL...)
        # from the environment, and they win over the values given here: Ferry's settings are
        # the only configuration, so Faust gets an empty environment.
        env={},
        broker=broker_urls(settings.require_bootstrap_servers()),
        store="memory://",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        # Ferry's topics are declared (or, declaration off, checked) by app/topics.py before Faust
        # starts; off, Faust creates none either (its table's changelog, its agents' topics).
        topic_allow_declare=settings.declare_topics,
        # No <app id>-__assignor-__leader topic: it only elects a leader for on_leader timers and
        # tasks, which Ferry has none of; one topic fewer for the operator to create.
        topic_disable_leader=True,
        web="ferry-pages://",
        web_port=settings.worker_web_port,
        web_bind=settings.worker_web_host,
        # Already left out by PagesOnlyWeb; off here too, so that no other web driver serves them.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        autodiscover=False,
        datadir=os.path.join(settings.worker_data_dir, "{conf.name}-data"),
        # Commit every second: after a crash, less is redelivered (and re-checked) than Faust's
        # default 2.8 s would leave.
        broker_commit_interval=1.0,
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_heartbeat_interval=settings.kafka_session_timeout_seconds / 4,
        # Multipart requests carry their files, and speech results their audio: the worker
        # writes records up to the topics' max.message.bytes (the dead letter, the changelog).
        producer_max_request_size=max_message_bytes(settings),
        # TLS and SASL for Faust's consumer, producer and admin client, as every other client has.
        **faust_broker_options(settings),
    )
    options.update(overrides)
    return faust.App(settings.app_id, **options)
