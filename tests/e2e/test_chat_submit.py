"""Chat submit refusals (nothing queued), TTL expiry, wrong paths, and polls on other replicas."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.jobs import RequestType
from app.topics import changelog_topic, partition_for, request_topic
from deploy.processes import FerryProcess, free_port
from tests.helpers import CHAT, end_offsets, ferry_settings_for, poll_until_done, start_api, submit, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


REFUSALS = [
    (b'{"model": "openai/gpt-4o-mini", "messages": [', "invalid request format: "),
    (b'["not", "an", "object"]', "invalid request format: the body must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model is required"),
    (b'{"model": "", "messages": [{"role": "user", "content": "hi"}]}', "model is required"),
    (b'{"model": "openai/gpt-4o-mini"}', "messages is required for chat completion"),
    (b'{"model": "openai/gpt-4o-mini", "messages": []}', "messages is required for chat completion"),
    (b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
     "stream is not supported for async chat completions"),
    (b'{"model": "nosuch/model-1", "messages": [{"role": "user", "content": "hi"}]}', "unknown provider: nosuch"),
    (b'{"model": "groq/llama-3", "messages": [{"role": "user", "content": "hi"}]}',
     "provider groq is not configured"),
    (b'{"model": "anthropic/claude", "messages": [{"role": "user", "content": "hi"}]}',
     "provider anthropic is not configured"),
    (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
     "model must be in the form provider/model, got 'gpt-4o-mini'"),
    (b'{"model": "openai/gpt-4o-mini", "fallbacks": ["nosuch/x"], "messages": [{"role": "user", "content": "hi"}]}',
     "unknown provider: nosuch"),
    (b'{"model": "openai/gpt-4o-mini", "fallbacks": "openai/x", "messages": [{"role": "user", "content": "hi"}]}',
     "invalid request format: fallbacks: Input should be a valid list"),
]


@pytest.mark.timeout(120)
async def test_refused_submits_queue_nothing(api, ferry_settings) -> None:
    for raw, message in REFUSALS:
        response = await api.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
        body = await response.json()
        assert response.status == 400, (raw, body)
        assert body["is_bifrost_error"] is True and body["extra_fields"] == {}
        assert body["status_code"] == 400
        assert body["error"]["message"].startswith(message) if message.endswith(": ") else \
            body["error"]["message"] == message, (raw, body)

    webhook = await api.post(CHAT, json={"model": "openai/gpt-4o-mini", "messages": MESSAGES},
                             headers={"x-bf-async-webhook": "billing"})
    assert webhook.status == 400
    assert (await webhook.json())["error"]["message"] == "webhook endpoint 'billing' is not configured"

    huge = [{"role": "user", "content": "x" * ferry_settings.max_request_bytes}]
    too_big = await api.post(CHAT, json={"model": "openai/gpt-4o-mini", "messages": huge})
    assert too_big.status == 413
    assert (await too_big.json())["error"]["message"].startswith("request body too large")

    assert await end_offsets(ferry_settings, request_topic(ferry_settings, RequestType.chat_completion)) == 0
    assert await end_offsets(ferry_settings, changelog_topic(ferry_settings)) == 0


@pytest.mark.timeout(120)
async def test_expired_job_reads_404_and_is_tombstoned(api, worker, ferry_settings) -> None:
    accepted = await submit(api, {"model": "openai/gpt-4o-mini", "messages": MESSAGES},
                            headers={"x-bf-async-job-result-ttl": "1"})
    job = await poll_until_done(api, accepted["id"])
    assert job["status"] == "completed"

    async def gone():
        response = await api.get(f"{CHAT}/{accepted['id']}")
        return response.status == 404 and (await response.json())["error"]["message"] == "job not found or expired"

    await wait_until(gone, 10, "the job to expire")

    # The worker deletes it from the table: the changelog's last record for the job is a tombstone.
    tp = TopicPartition(changelog_topic(ferry_settings), partition_for(accepted["id"], ferry_settings.topic_partitions))

    async def last_value_for_job():
        consumer = AIOKafkaConsumer(bootstrap_servers=ferry_settings.kafka_bootstrap_servers,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            values = []
            while await consumer.position(tp) < end:
                for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if record.key == accepted["id"].encode():
                        values.append(record.value)
            return values
        finally:
            await consumer.stop()

    values = await wait_until(lambda: _tombstoned(last_value_for_job), 20, "the tombstone")
    assert values[-1] is None and len(values) >= 3  # pending, (processing,) completed, tombstone
    assert worker.get(accepted["id"]) is None


async def _tombstoned(read):
    values = await read()
    return values if values and values[-1] is None else None


@pytest.mark.timeout(120)
async def test_poll_on_another_request_types_path_is_404(api, worker) -> None:
    accepted = await submit(api, {"model": "openai/gpt-4o-mini", "messages": MESSAGES})
    await poll_until_done(api, accepted["id"])
    response = await api.get(f"/v1/async/embeddings/{accepted['id']}")
    assert response.status == 404
    assert (await response.json())["error"]["message"] == "operation type mismatch"
    for unknown in ("00000000-0000-4000-8000-000000000000", "not-a-uuid"):
        response = await api.get(f"{CHAT}/{unknown}")
        assert response.status == 404
        assert (await response.json())["error"]["message"] == "job not found or expired"


@pytest.mark.timeout(120)
async def test_job_belongs_to_its_service_key(api, worker) -> None:
    accepted = await submit(api, {"model": "openai/gpt-4o-mini", "messages": MESSAGES},
                            headers={"x-bf-vk": "sk-bf-alice"})
    url = f"{CHAT}/{accepted['id']}"
    assert (await (await api.get(url)).json())["error"]["message"] == "virtual key is required"
    wrong = await api.get(url, headers={"Authorization": "Bearer sk-bf-bob"})
    assert wrong.status == 404 and (await wrong.json())["error"]["message"] == "virtual key mismatch"
    right = await api.get(url, headers={"Authorization": "Bearer sk-bf-alice"})
    assert right.status in (200, 202)


@pytest.fixture
async def second_api(ferry_settings, tmp_path):
    """Another API process (``python -m api``) over the same topics."""
    port = free_port()
    process = FerryProcess("api", ferry_settings, tmp_path / "api", FERRY_API_PORT=str(port)).start()
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")

    async def ready():
        try:
            return (await session.get("/health/ready")).status == 200
        except aiohttp.ClientError:
            return False

    try:
        await wait_until(ready, 60, "the second API process", interval=0.2)
        yield session
    finally:
        await session.close()
        process.terminate()


@pytest.mark.timeout(180)
async def test_poll_right_after_submit_on_another_api_process(api, second_api) -> None:
    # No worker runs: every job stays pending, and the other process must know each one at once.
    for _ in range(20):
        accepted = await submit(api, {"model": "openai/gpt-4o-mini", "messages": MESSAGES})
        response = await second_api.get(f"{CHAT}/{accepted['id']}")
        assert response.status == 202, await response.text()
        assert await response.json() == accepted


@pytest.mark.timeout(300)
async def test_pending_behind_a_backlog_of_ten_thousand(api, second_api, ferry_settings) -> None:
    body = {"model": "openai/gpt-4o-mini", "messages": MESSAGES}
    backlog = 10_000
    accepted_count = maybe_queued = 0
    while accepted_count < backlog:
        batch = min(250, backlog - accepted_count)
        statuses = await asyncio.gather(*(api.post(CHAT, json=body) for _ in range(batch)))
        # A loaded machine may take longer than the submit timeout: a 503 is then retried, as a
        # client would; one that names its job may have been queued all the same.
        assert {r.status for r in statuses} <= {202, 503}
        accepted_count += sum(1 for r in statuses if r.status == 202)
        maybe_queued += sum(1 for r in statuses if r.status == 503 and "x-bf-async-job-id" in r.headers)
    queued = await end_offsets(ferry_settings, request_topic(ferry_settings, RequestType.chat_completion))
    assert backlog <= queued <= backlog + maybe_queued

    accepted = await submit(api, body)
    for client in (api, second_api):
        response = await client.get(f"{CHAT}/{accepted['id']}")
        assert response.status == 202
        assert (await response.json())["status"] == "pending"


@pytest.mark.timeout(300)
async def test_broker_down_at_submit_is_503_and_polls_still_answer(private_broker, settings, fake_openai) -> None:
    private_broker.start()
    own = ferry_settings_for(settings, fake_openai, kafka_bootstrap_servers=private_broker.bootstrap_servers)
    api = await start_api(own)
    try:
        body = {"model": "openai/gpt-4o-mini", "messages": MESSAGES}
        accepted = await submit(api, body)

        private_broker.kill()
        for _ in range(3):
            response = await api.post(CHAT, json=body)
            assert response.status == 503
            assert 1 <= int(response.headers["Retry-After"]) <= 30  # grows with the outage, jittered
            error = await response.json()
            assert error["is_bifrost_error"] is True and error["status_code"] == 503
            assert "Kafka is unavailable" in error["error"]["message"]
        # Polls are answered from the API's own view while the broker is away; an id the view
        # cannot vouch for is 503, not a 404 that might be wrong.
        response = await api.get(f"{CHAT}/{accepted['id']}")
        assert response.status == 202 and (await response.json())["id"] == accepted["id"]
        unknown = await api.get(f"{CHAT}/00000000-0000-4000-8000-000000000000")
        assert unknown.status == 503 and 1 <= int(unknown.headers["Retry-After"]) <= 30

        private_broker.start()

        async def accepted_again():
            return (await api.post(CHAT, json=body)).status == 202

        await wait_until(accepted_again, 90, "submits to be accepted after the broker returned", interval=0.5)
    finally:
        await api.close()
