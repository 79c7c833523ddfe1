"""The Faust app: one factory, so the worker, the tests and the tools configure it alike."""

from __future__ import annotations

import os

import faust

from app.settings import Settings
from app.topics import max_message_bytes


def broker_urls(bootstrap_servers: str) -> list[str]:
    """``host:port,host:port`` in the form Faust takes (``kafka://host:port`` each)."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()]


def create_app(settings: Settings, **overrides) -> faust.App:
    """A Faust app for ``settings``; ``overrides`` are passed to ``faust.App`` (tests use it)."""
    os.makedirs(settings.worker_data_dir, exist_ok=True)  # Faust creates only the last level
    options = dict(
        broker=broker_urls(settings.require_bootstrap_servers()),
        store="memory://",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        web_port=settings.worker_web_port,
        web_bind="0.0.0.0",
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
    )
    options.update(overrides)
    return faust.App(settings.app_id, **options)
