"""Shared fixtures: one real Kafka broker for the whole run, and per-test isolated settings."""

from __future__ import annotations

import uuid

import pytest

from app.settings import Settings
from deploy.kafka.locate import locate


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The broker every Kafka test uses, found or started the one way Ferry does it."""
    handle = locate(Settings())
    yield handle.bootstrap_servers
    handle.release()


@pytest.fixture
def unique_id() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(kafka_bootstrap: str, unique_id: str) -> Settings:
    """Settings whose app id and topic names belong to this test alone."""
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        app_id=f"ferry-{unique_id}",
        topic_prefix=f"ferry-{unique_id}",
        topic_partitions=4,
    )
