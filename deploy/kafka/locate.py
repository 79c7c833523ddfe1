"""The one way to find a Kafka broker, shared by `make run`, the tests and CI.

In order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` (read through ``app.settings.Settings``) when it is set;
2. otherwise, when a Docker engine answers, a throwaway testcontainers Kafka container;
3. otherwise the local broker of ``deploy.kafka.broker`` (started here if it is not running).

``locate()`` returns a handle whose ``release()`` stops only what ``locate()`` itself started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from app.settings import Settings
from deploy.kafka.broker import LocalKafka

log = logging.getLogger(__name__)


@dataclass
class BrokerHandle:
    """Where the broker is, how it was found, and how to let go of it."""

    bootstrap_servers: str
    source: str  # "environment", "testcontainers" or "local"
    _release: Callable[[], object] = field(default=lambda: None, repr=False)

    def release(self) -> None:
        release, self._release = self._release, (lambda: None)
        release()


def _docker_engine_answers() -> bool:
    try:
        import docker  # installed with testcontainers

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no socket, no permission, no package: all mean "no engine"
        return False


def _start_container() -> BrokerHandle:
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer().with_kraft()
    container.start()
    return BrokerHandle(container.get_bootstrap_server(), "testcontainers", container.stop)


def locate(settings: Settings | None = None, *, local: LocalKafka | None = None) -> BrokerHandle:
    """Find or start a broker, following the order in this module's docstring."""
    settings = settings or Settings()
    if settings.kafka_bootstrap_servers:
        return BrokerHandle(settings.kafka_bootstrap_servers, "environment")
    if _docker_engine_answers():
        log.info("a Docker engine answers: starting a Kafka container")
        return _start_container()
    broker = local or LocalKafka(port=settings.local_kafka_port)
    already_running = broker.running_pid() is not None
    bootstrap = broker.start()
    release = (lambda: None) if already_running else broker.stop
    return BrokerHandle(bootstrap, "local", release)
