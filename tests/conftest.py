"""Shared fixtures: one real Kafka broker for the run, isolated settings, a fake provider,
and Ferry's API and worker running in-process against them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import uuid
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from faust.contrib.asgi import faust_app_running

from api.connections import ConnectionLimits, GuardedAppRunner
from api.server import create_api
from app.settings import Settings
from app.topics import declare_topics
from deploy.fakes.openai_server import FakeOpenAI
from deploy.kafka.broker import LocalKafka
from deploy.kafka.locate import locate
from workers.app import FerryWorker

PROVIDER_KEY = "sk-test-provider-key-0123456789"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The broker every Kafka test uses, found or started the one way Ferry does it."""
    handle = locate(Settings())
    yield handle.bootstrap_servers
    handle.release()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """A port p such that p and p+1 (a broker's controller) can both be bound right now.

    Chosen below the kernel's ephemeral range (32768 and up): a port from that range can be
    taken by any client connection in the seconds before the broker binds it, which failed a
    CI run. 21000-28999 also stays clear of the brokers on 19092 and 29092.
    """
    for _ in range(200):
        port = random.randrange(21000, 29000, 2)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError("no free port pair")


@pytest.fixture
def private_broker(tmp_path: Path) -> LocalKafka:
    """A broker of this test's own, for tests that stop or kill it."""
    broker = LocalKafka(home=tmp_path / "kafka", port=_free_port_pair(), heap="512m")
    yield broker
    broker.stop()


@pytest.fixture
def unique_id() -> str:
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
    fake = await FakeOpenAI(api_key=PROVIDER_KEY).start()
    yield fake
    await fake.stop()


def ferry_settings_for(settings: Settings, fake: FakeOpenAI, **overrides) -> Settings:
    """``settings`` with the fake as the openai provider, plus ``overrides``."""
    values = settings.model_dump(exclude={"providers"}) | {
        "providers": {"openai": {"base_url": fake.base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 5}},
        "worker_maintenance_interval_seconds": 0.5,
    }
    return Settings(**(values | overrides))


@pytest.fixture
def ferry_settings(settings: Settings, fake_openai: FakeOpenAI) -> Settings:
    return ferry_settings_for(settings, fake_openai)


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Await ``predicate()`` (sync or async) until truthy; fail the test after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)


class GuardedTestServer(TestServer):
    """aiohttp's TestServer serving through the API's connection guard, as ``python -m api`` does."""

    def __init__(self, app, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_runner(self, **kwargs) -> GuardedAppRunner:
        return GuardedAppRunner(self.app, self._limits, **kwargs)


async def start_api(settings: Settings) -> TestClient:
    await declare_topics(settings)
    client = TestClient(GuardedTestServer(create_api(settings), ConnectionLimits.from_settings(settings)))
    await client.start_server()

    async def ready() -> bool:
        return (await client.get("/health/ready")).status == 200

    await wait_until(ready, 30, "the API to be ready")
    return client


@pytest.fixture
async def api(ferry_settings: Settings) -> TestClient:
    client = await start_api(ferry_settings)
    yield client
    await client.close()


@contextlib.asynccontextmanager
async def worker_running(settings: Settings, **app_overrides):
    """A Ferry worker running in this process and event loop (``app_overrides``: Faust settings)."""
    await declare_topics(settings)
    ferry_worker = FerryWorker(settings, web_enabled=False, **app_overrides)
    async with faust_app_running(ferry_worker.app, stop_timeout=60):
        yield ferry_worker


@pytest.fixture
async def worker(ferry_settings: Settings) -> FerryWorker:
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
