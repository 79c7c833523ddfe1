"""Shared fixtures: one real Kafka broker for the run (and a three-node cluster for the tests that
ask for one), isolated settings, a fake provider, and Ferry's API and worker running in-process
against them (helpers are in tests/helpers.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

# Before the import: the helpers' asserts then explain their failures as a test's do.
pytest.register_assert_rewrite("tests.helpers")

from app.settings import Settings  # noqa: E402
from deploy.fakes.openai_server import FakeOpenAI  # noqa: E402
from deploy.kafka.broker import LocalKafka  # noqa: E402
from deploy.kafka.cluster import LocalKafkaCluster  # noqa: E402
from deploy.kafka.locate import locate  # noqa: E402
from tests.helpers import PROVIDER_KEY, ferry_settings_for, free_port_pair, start_api, worker_running  # noqa: E402
from workers.app import FerryWorker  # noqa: E402


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The broker every Kafka test uses, found or started the one way Ferry does it."""
    handle = locate(Settings())
    yield handle.bootstrap_servers
    handle.release()


@pytest.fixture
def private_broker(tmp_path: Path) -> LocalKafka:
    """A broker of this test's own, for tests that stop or kill it."""
    broker = LocalKafka(home=tmp_path / "kafka", port=free_port_pair(), heap="512m")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def _kafka_cluster_for_session() -> LocalKafkaCluster:
    """The three-node cluster, started the first time a test asks for it; one that already ran (a
    developer's `make cluster`) is reused and left running, as the single broker is."""
    cluster = LocalKafkaCluster(port=Settings().local_kafka_cluster_port)
    already_running = any(pid is not None for pid in cluster.running().values())
    cluster.start()
    yield cluster
    if not already_running:
        cluster.stop()


@pytest.fixture
def kafka_cluster(_kafka_cluster_for_session: LocalKafkaCluster) -> LocalKafkaCluster:
    """The three-node cluster with every node running, for tests that stop, kill and restart nodes
    (a node an earlier test left down is started again first)."""
    _kafka_cluster_for_session.start()
    return _kafka_cluster_for_session


@pytest.fixture
def unique_id() -> str:
    """A short id of this test's own, for names it makes (app id, topics)."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(kafka_bootstrap: str, unique_id: str, tmp_path: Path) -> Settings:
    """Settings whose app id, topic names and worker files belong to this test alone; the
    test's topics are deleted after it."""
    yield Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        worker_data_dir=str(tmp_path / "faust"),
        app_id=f"ferry-{unique_id}",
        topic_prefix=f"ferry-{unique_id}",
        topic_partitions=4,
    )
    asyncio.run(delete_topics(kafka_bootstrap, f"ferry-{unique_id}"))


@pytest.fixture
def cluster_settings(kafka_cluster: LocalKafkaCluster, unique_id: str, tmp_path: Path) -> Settings:
    """Settings of this test's own on the three-node cluster: Ferry's topics at three replicas
    (``min.insync.replicas`` 2), so any one node can be lost; the topics are deleted after."""
    yield Settings(
        kafka_bootstrap_servers=kafka_cluster.bootstrap_servers,
        topic_replication_factor=3,
        worker_data_dir=str(tmp_path / "faust"),
        app_id=f"ferry-{unique_id}",
        topic_prefix=f"ferry-{unique_id}",
        topic_partitions=4,
    )
    asyncio.run(delete_topics(kafka_cluster.bootstrap_servers, f"ferry-{unique_id}"))


async def delete_topics(bootstrap_servers: str, prefix: str) -> None:
    """Delete the topics whose names start with ``prefix`` (best effort).

    Every test that runs Ferry makes some fifteen topics of four partitions; a broker that keeps
    them all holds several open files per partition and, a few hundred tests later, runs out.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        async with asyncio.timeout(30):
            await admin.start()
            doomed = [topic for topic in await admin.list_topics() if topic.startswith(prefix)]
            if doomed:
                await admin.delete_topics(doomed)
    except (KafkaError, TimeoutError) as exc:
        logging.getLogger(__name__).warning("could not delete the test's topics: %s", exc)
    finally:
        await admin.close()


@pytest.fixture
async def fake_openai() -> FakeOpenAI:
    """An OpenAI-compatible fake provider on loopback, expecting ``PROVIDER_KEY``."""
    fake = await FakeOpenAI(api_key=PROVIDER_KEY).start()
    yield fake
    await fake.stop()


@pytest.fixture
def ferry_settings(settings: Settings, fake_openai: FakeOpenAI) -> Settings:
    """This test's settings with ``fake_openai`` as the openai provider."""
    return ferry_settings_for(settings, fake_openai)


@pytest.fixture
async def api(ferry_settings: Settings) -> TestClient:
    """A client of the API running in this process on ``ferry_settings``."""
    client = await start_api(ferry_settings)
    yield client
    await client.close()


@pytest.fixture
async def worker(ferry_settings: Settings) -> FerryWorker:
    """A Ferry worker running in this process on ``ferry_settings``."""
    async with worker_running(ferry_settings) as ferry_worker:
        yield ferry_worker


def pytest_addoption(parser: pytest.Parser) -> None:
    # The fuzz test's budget, as an option because tests do not read the environment.
    parser.addoption(
        "--fuzz-examples", type=int, default=50, metavar="N",
        help="Cases schemathesis generates per API operation and phase in tests/fuzz (default 50, about "
             "a minute; 1000 or more to fuzz longer).",
    )
    parser.addoption(
        "--fuzz-seed", type=int, default=20261202, metavar="N",
        help="Seed of tests/fuzz's case generation: fixed, so that a run is repeatable; another seed "
             "explores other cases.",
    )
