"""Helpers shared by test modules: running Ferry's parts, submitting and polling jobs, reading
topics, and chaos bookkeeping. Fixtures stay in tests/conftest.py; no test module imports from
another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections import Counter

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from faust.contrib.asgi import faust_app_running

from api.connections import ConnectionLimits, GuardedAppRunner, serve
from api.routes import READ_MODEL
from api.server import create_api
from app.jobs import JobStatus, RequestType
from app.kafka_clients import client_options
from app.settings import Settings
from app.topics import declare_topics, partition_for, request_topic
from deploy.fakes.openai_server import FakeOpenAI
from deploy.processes import FerryProcess
from workers.app import FerryWorker

PROVIDER_KEY = "sk-test-provider-key-0123456789"
CHAT = "/v1/async/chat/completions"
# Bounds on waits for something that must happen; a test fails when one passes, none measures time.
CUT_OFF_WITHIN = 30


# -- waiting ----------------------------------------------------------------------------------------

async def wait_until(predicate, timeout: float, what, interval: float = 0.05):
    """Await ``predicate()`` (sync or async) until truthy and return its value; fail the test
    after ``timeout`` seconds, naming ``what`` (a string, or a callable that makes one)."""
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


# -- ports ------------------------------------------------------------------------------------------

async def answers_200(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether ``url`` answers 200 now; a process starting, busy or gone answers no."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_ready(url: str, what: str, timeout: float = 90) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: answers_200(session, url), timeout, what, 0.2)


async def worker_ready(worker: FerryProcess, name: str) -> None:
    await wait_ready(f"http://127.0.0.1:{worker.web_port}/health/ready", f"the {name} worker to be ready")


def bindable(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port p such that p and p+1 (a broker's controller) can both be bound right now.

    Chosen below the kernel's ephemeral range (32768 and up): a port from that range can be
    taken by any client connection in the seconds before the broker binds it, which failed a
    CI run. 21000-28999 also stays clear of the brokers on 19092 and 29092.
    """
    for _ in range(200):
        port = random.randrange(21000, 29000, 2)
        if bindable(port) and bindable(port + 1):
            return port
    raise RuntimeError("no free port pair")


# -- settings ---------------------------------------------------------------------------------------

def ferry_settings_for(settings: Settings, fake: FakeOpenAI, **overrides) -> Settings:
    """``settings`` with the fake as the openai provider, plus ``overrides``."""
    values = settings.model_dump(exclude={"providers"}) | {
        "providers": {"openai": {"base_url": fake.base_url, "api_key": PROVIDER_KEY, "timeout_seconds": 5}},
        "worker_maintenance_interval_seconds": 0.5,
    }
    return Settings(**(values | overrides))


def with_values(settings: Settings, **values) -> Settings:
    """``settings`` with ``values`` replaced, validated again."""
    return Settings(**(settings.model_dump() | values))


# -- Ferry's parts in this process ------------------------------------------------------------------

class GuardedTestServer(TestServer):
    """aiohttp's TestServer serving through the API's connection guard, as ``python -m api`` does."""

    def __init__(self, app, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_runner(self, **kwargs) -> GuardedAppRunner:
        return GuardedAppRunner(self.app, self._limits, **kwargs)


async def start_api(settings: Settings) -> TestClient:
    """The API on a test server, its topics declared, once it answers ready; the caller closes it."""
    await declare_topics(settings)
    client = TestClient(GuardedTestServer(create_api(settings), ConnectionLimits.from_settings(settings)))
    await client.start_server()

    async def ready() -> bool:
        return (await client.get("/health/ready")).status == 200

    await wait_until(ready, 30, "the API to be ready")
    return client


@contextlib.asynccontextmanager
async def guarded_api(settings: Settings, **overrides):
    """The API served with the guard, as ``python -m api`` serves it; yields its port."""
    settings = settings.model_copy(update=overrides)
    runner, port = await serve(create_api(settings), ConnectionLimits.from_settings(settings), "127.0.0.1", 0)
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def worker_running(settings: Settings, **app_overrides):
    """A Ferry worker running in this process and event loop (``app_overrides``: Faust settings)."""
    await declare_topics(settings)
    ferry_worker = FerryWorker(settings, web_enabled=False, **app_overrides)
    async with faust_app_running(ferry_worker.app, stop_timeout=60):
        yield ferry_worker


@contextlib.asynccontextmanager
async def worker_with_web(settings: Settings):
    """A worker running in this process with its web server on, at ``settings.worker_web_port``."""
    await declare_topics(settings)
    ferry_worker = FerryWorker(settings)
    async with faust_app_running(ferry_worker.app, stop_timeout=60):
        yield ferry_worker


# -- jobs through the API ---------------------------------------------------------------------------

def job_body(marker: str, **fake) -> dict:
    """A chat job whose message is ``marker`` (how the fake's records are matched to jobs), with
    ``fake`` as its ``x_fake`` directives."""
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": marker}]}
    if fake:
        body["x_fake"] = fake
    return body


async def submit(api, body: dict, headers: dict | None = None) -> dict:
    """Submit a chat job; asserts the 202 and returns its body."""
    response = await api.post(CHAT, json=body, headers=headers or {})
    assert response.status == 202, await response.text()
    return await response.json()


async def submit_all(api, bodies: list[dict], concurrency: int = 100) -> list[str]:
    """Submit chat jobs ``concurrency`` at a time; asserts every 202 and returns the ids in order."""
    ids: list[str] = []
    for start in range(0, len(bodies), concurrency):
        responses = await asyncio.gather(*(api.post(CHAT, json=b) for b in bodies[start:start + concurrency]))
        for response in responses:
            assert response.status == 202, await response.text()
            ids.append((await response.json())["id"])
    return ids


async def poll_until_done(api, job_id: str, path: str = CHAT, timeout: float = 60) -> dict:
    """Poll the job until it answers 200 (terminal); asserts every other answer is a 202."""
    async def done():
        response = await api.get(f"{path}/{job_id}")
        if response.status == 200:
            return await response.json()
        assert response.status == 202, await response.text()
        return None

    return await wait_until(done, timeout, f"job {job_id} to finish")


# -- job states, as the API's read model holds them -------------------------------------------------

def states(api, ids: list[str]) -> Counter:
    """How many of the jobs are in each status (``None``: not yet in the API's read model)."""
    view = api.server.app[READ_MODEL]
    return Counter((view.get(job_id).status if view.get(job_id) else None) for job_id in ids)


def terminal_count(api, ids: list[str]) -> int:
    """How many of the jobs are completed or failed in the API's read model."""
    counted = states(api, ids)
    return counted[JobStatus.completed] + counted[JobStatus.failed]


def unfinished(api, ids: list[str], settings: Settings) -> list[tuple]:
    """For a failure message: each unfinished job's marker number, status, partition, attempts."""
    view = api.server.app[READ_MODEL]
    return [(k, view.get(job_id).status.value, partition_for(job_id, settings.topic_partitions),
             view.get(job_id).attempts) for k, job_id in enumerate(ids) if not view.get(job_id).status.is_terminal]


def calls_per_marker(fake: FakeOpenAI) -> Counter:
    """How many calls the fake received per job marker (its last message)."""
    return Counter(r.body["messages"][-1]["content"] for r in fake.requests)


def report(name: str, **figures) -> None:
    """Print a chaos test's measured figures as one ``CHAOS`` line (seen with ``-s``)."""
    print(f"\nCHAOS {name} {json.dumps(figures)}")


# -- Kafka ------------------------------------------------------------------------------------------

async def read_records(settings: Settings, topic: str) -> list[ConsumerRecord]:
    """Every record of a topic, in offset order per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def read_topic(settings: Settings, topic: str) -> list[tuple[str, bytes | None]]:
    """Every (key, value) of a topic, in offset order per partition."""
    return [(record.key.decode(), record.value) for record in await read_records(settings, topic)]


async def end_offsets(settings: Settings, topic: str) -> int:
    """The sum of the topic's end offsets over ``settings.topic_partitions`` partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def delete_every_record(settings: Settings, topic: str) -> None:
    """What retention does to a topic: every record up to each partition's end is gone."""
    bootstrap = settings.require_bootstrap_servers()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(settings.topic_partitions)])
        await admin.delete_records({tp: RecordsToDelete(end) for tp, end in ends.items()})
    finally:
        await consumer.stop()
        await admin.close()


async def topics_named(settings: Settings, *prefixes: str) -> set[str]:
    """The broker's topics whose names start with one of ``prefixes``."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        return {name for name in await admin.list_topics() if name.startswith(prefixes)}
    finally:
        await admin.close()


def prefixes(settings: Settings) -> tuple[str, str]:
    """The name prefixes of the topics Ferry makes for ``settings``: its own and Faust's."""
    return settings.topic_prefix, settings.app_id


# -- raw HTTP ---------------------------------------------------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response: status, headers (lower-case names), body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CUT_OFF_WITHIN)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines if line)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), CUT_OFF_WITHIN)
    return int(status_line.split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails the test if it never does)."""
    try:
        return await asyncio.wait_for(reader.read(), CUT_OFF_WITHIN)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {CUT_OFF_WITHIN} s")


def assert_contract_error(body: bytes, status: int) -> dict:
    """Assert ``body`` is the contract's error object for a service error with ``status``; return it."""
    error = json.loads(body)
    assert error["is_bifrost_error"] is True and error["status_code"] == status
    assert error["error"]["message"] and error["extra_fields"] == {}
    return error


async def committed_everything(settings: Settings) -> bool:
    """Whether the group has committed the chat request topic up to its end, on every partition."""
    topic = request_topic(settings, RequestType.chat_completion)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.app_id)
    finally:
        await admin.close()
    done = sum(meta.offset for tp, meta in committed.items() if tp.topic == topic and meta.offset > 0)
    return done == await end_offsets(settings, topic)
