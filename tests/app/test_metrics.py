"""The metrics module: bounded labels, one registry per app, and the provider caller's and the
runner's counts against a fake provider on loopback."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.jobs import JobEvent, JobRequest, RequestType, Target, utcnow
from app.metrics import (
    EXACT_STATUS_CODES,
    REFUSAL_REASONS,
    ApiMetrics,
    WorkerMetrics,
    WorkerSnapshot,
    refusal_reason,
    status_label,
)
from app.settings import Settings
from deploy.fakes.openai_server import FakeOpenAI
from workers.caller import ProviderCaller
from workers.runner import JobRunner

KEY = "sk-test-provider-key-0123456789"


def samples(text: bytes) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_status_labels_are_bounded_whatever_a_provider_answers() -> None:
    labels = {status_label(code) for code in range(-5, 1200)}
    assert labels <= {str(code) for code in EXACT_STATUS_CODES} | {"1xx", "2xx", "3xx", "4xx", "5xx", "other"}
    assert (status_label(429), status_label(418), status_label(201), status_label(999)) == ("429", "4xx", "2xx",
                                                                                            "other")


def test_refusal_reasons_are_a_fixed_set() -> None:
    assert {refusal_reason(status) for status in range(400, 600)} | {refusal_reason(503, uncertain=True)} \
        <= set(REFUSAL_REASONS)
    assert refusal_reason(503, uncertain=True) == "kafka_uncertain"
    assert refusal_reason(413) == "too_large"


def test_each_app_counts_in_its_own_registry() -> None:
    first, second = ApiMetrics(), ApiMetrics()  # two apps in one process: no "duplicated timeseries" error
    first.count_answer("submit", RequestType.embedding, 202, 0.01)
    first.count_answer("submit", RequestType.embedding, 400, 0.01)
    found, other = samples(first.render()[0]), samples(second.render()[0])
    assert value(found, "ferry_jobs_submitted_total", request_type="embedding") == 1
    assert value(found, "ferry_jobs_refused_total", request_type="embedding", reason="invalid_request") == 1
    assert value(other, "ferry_jobs_submitted_total", request_type="embedding") == 0
    first.count_answer("submit", RequestType.embedding, 202, 0.01)  # the same series again
    found = samples(first.render()[0])
    assert value(found, "ferry_api_responses_total", operation="submit", status_code="202") == 2
    assert value(found, "ferry_api_request_duration_seconds_count", operation="submit") == 3
    assert first.render()[1].startswith("text/plain")


def test_an_unconfigured_provider_name_is_not_a_label() -> None:
    metrics = WorkerMetrics(["openai"])
    assert (metrics.provider("openai"), metrics.provider("made-up-by-a-client"), metrics.provider(None)) == \
        ("openai", "unknown", "none")


def test_scrape_time_values_come_from_the_snapshot() -> None:
    metrics = WorkerMetrics(["openai"])
    snapshot = WorkerSnapshot(jobs_in_flight=3, possible_duplicate_calls=2, duplicate_outcomes=1,
                              dead_lettered_jobs=4, consumer_lag={RequestType.rerank: 7})
    metrics.watch(lambda: snapshot)
    found = samples(metrics.render()[0])
    assert value(found, "ferry_worker_jobs_in_flight") == 3
    assert value(found, "ferry_worker_possible_duplicate_calls_total") == 2
    assert value(found, "ferry_worker_duplicate_outcomes_total") == 1
    assert value(found, "ferry_jobs_dead_lettered_total") == 4
    assert value(found, "ferry_worker_consumer_lag", request_type="rerank") == 7
    assert value(found, "ferry_worker_consumer_lag", request_type="ocr") == 0
    snapshot.jobs_in_flight = 0
    assert value(samples(metrics.render()[0]), "ferry_worker_jobs_in_flight") == 0  # read at each scrape


@pytest.fixture
async def fake() -> FakeOpenAI:
    server = await FakeOpenAI(api_key=KEY).start()
    yield server
    await server.stop()


@pytest.mark.timeout(60)
async def test_runner_and_caller_count_calls_retries_outcomes_and_durations(fake: FakeOpenAI) -> None:
    settings = Settings(providers={"openai": {"base_url": fake.base_url, "api_key": KEY, "timeout_seconds": 5}},
                        retry_max_attempts=2, retry_initial_backoff_seconds=0.01, http_max_connections=25)
    metrics = WorkerMetrics(settings.provider_endpoints)
    caller = ProviderCaller(settings, metrics=metrics)
    outcomes: list[JobEvent] = []

    async def report(event: JobEvent) -> None:
        if event.kind == "outcome":
            outcomes.append(event)

    runner = JobRunner(caller, report, max_in_flight=4, metrics=metrics)
    await caller.start()
    try:
        # One job at a time: a 429 then success (one retry); 500 twice (failed); success.
        for failures in ([(429, None)], [(500, None), (500, None)], []):
            while runner.in_flight:
                await asyncio.sleep(0.01)
            fake.fail_next = failures
            request = JobRequest(id=str(uuid.uuid4()), request_type=RequestType.chat_completion, created_at=utcnow(),
                                 ttl_seconds=60, targets=[Target.parse("openai/gpt-4o-mini")],
                                 body={"messages": [{"role": "user", "content": "hi"}]})
            assert await runner.wait_for_slot()
            runner.launch(request)
        while len(outcomes) < 3 or runner.in_flight:
            await asyncio.sleep(0.01)
    finally:
        await runner.drain(5)
        await caller.stop()
    assert sorted(event.outcome.status_code for event in outcomes) == [200, 200, 500]
    found = samples(metrics.render()[0])
    chat = "chat_completion"
    assert value(found, "ferry_jobs_completed_total", request_type=chat, provider="openai") == 2
    assert value(found, "ferry_jobs_failed_total", request_type=chat, provider="openai") == 1
    assert value(found, "ferry_provider_calls_total", provider="openai", status_code="200") == 2
    assert value(found, "ferry_provider_calls_total", provider="openai", status_code="429") == 1
    assert value(found, "ferry_provider_calls_total", provider="openai", status_code="500") == 2
    assert value(found, "ferry_provider_retries_total", provider="openai") == 2
    assert value(found, "ferry_provider_calls_in_flight", provider="openai") == 0
    assert value(found, "ferry_provider_call_duration_seconds_count", provider="openai", request_type=chat) == 5
    assert value(found, "ferry_job_queue_wait_seconds_count", request_type=chat) == 3
    assert value(found, "ferry_job_duration_seconds_count", request_type=chat, status="completed") == 2
    assert value(found, "ferry_job_duration_seconds_count", request_type=chat, status="failed") == 1
    assert len(fake.requests) == 5
