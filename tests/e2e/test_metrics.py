"""``/metrics`` on a live stack: jobs run through the API, Kafka, a worker and a fake provider,
then both pages are scraped over HTTP and their numbers read back; every label value is from a
bounded set (never a job id)."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.jobs import RequestType
from app.metrics import API_OPERATIONS, EXACT_STATUS_CODES, REFUSAL_REASONS
from app.settings import Settings
from deploy.processes import free_port
from tests.helpers import CHAT, poll_until_done, start_api, submit, wait_until, worker_with_web

EMBEDDINGS = "/v1/async/embeddings"
HELLO = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}

# What each label may be: anything else (a job id, a model, a message) fails the test.
BOUNDED = {
    "request_type": {request_type.value for request_type in RequestType},
    "provider": {"openai", "unknown", "none"},
    "status_code": {str(code) for code in EXACT_STATUS_CODES} | {"1xx", "2xx", "3xx", "4xx", "5xx", "other",
                                                                "timeout", "unreachable", "not_sent",
                                                                "202", "404", "405", "408", "413"},
    "reason": set(REFUSAL_REASONS),
    "operation": set(API_OPERATIONS),
    "status": {"completed", "failed"},
}


def read(text: str) -> dict[tuple[str, frozenset], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                if label != "le":  # histogram buckets: numbers
                    assert label_value in BOUNDED[label], (sample.name, label, label_value)
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: dict, name: str, **labels: str) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (sample, sample_labels), v in found.items()
               if sample == name and frozenset(labels.items()) <= sample_labels)


@pytest.mark.timeout(240)
async def test_metrics_of_a_live_stack_read_back(ferry_settings: Settings, fake_openai) -> None:
    port = free_port()
    settings = ferry_settings.model_copy(update={"worker_web_port": port, "retry_max_attempts": 2,
                                                 "retry_initial_backoff_seconds": 0.01,
                                                 "max_request_bytes": 1024})
    api = await start_api(settings)
    try:
        async with worker_with_web(settings), aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as web:
            job_ids = []
            for _ in range(3):
                job_ids.append((await submit(api, HELLO))["id"])
                assert (await poll_until_done(api, job_ids[-1]))["status"] == "completed"
            fake_openai.fail_next = [(500, None), (500, None)]  # both calls the job may make
            job_ids.append((await submit(api, HELLO))["id"])
            failed = await poll_until_done(api, job_ids[-1])
            assert (failed["status"], failed["status_code"]) == ("failed", 500)
            embedding = await api.post(EMBEDDINGS, json={"model": "openai/text-embedding-3-small", "input": "hi"})
            assert embedding.status == 202
            job_ids.append((await embedding.json())["id"])
            assert (await poll_until_done(api, job_ids[-1], path=EMBEDDINGS))["status"] == "completed"

            # Refused submits: two invalid, one too large. Then a poll of an unknown job.
            assert (await api.post(CHAT, data=b"{not json", headers={"Content-Type": "application/json"})).status == 400
            assert (await api.post(CHAT, json={**HELLO, "model": "nowhere/model"})).status == 400
            assert (await api.post(CHAT, json={**HELLO, "padding": "x" * 2000})).status == 413
            assert (await api.get(f"{CHAT}/00000000-0000-4000-8000-000000000000")).status == 404

            scraped = await api.get("/metrics")
            assert scraped.status == 200 and scraped.content_type == "text/plain"
            api_text = await scraped.text()
            found = read(api_text)
            chat, embed = "chat_completion", "embedding"
            assert value(found, "ferry_jobs_submitted_total", request_type=chat) == 4
            assert value(found, "ferry_jobs_submitted_total", request_type=embed) == 1
            assert value(found, "ferry_jobs_submitted_total", request_type="ocr") == 0
            assert value(found, "ferry_jobs_refused_total", request_type=chat, reason="invalid_request") == 2
            assert value(found, "ferry_jobs_refused_total", request_type=chat, reason="too_large") == 1
            assert total(found, "ferry_jobs_refused_total") == 3
            assert value(found, "ferry_api_responses_total", operation="submit", status_code="202") == 5
            assert value(found, "ferry_api_responses_total", operation="poll", status_code="200") == 5
            assert value(found, "ferry_api_responses_total", operation="poll", status_code="404") == 1
            assert value(found, "ferry_api_request_duration_seconds_count", operation="submit") == 8

            async def worker_metrics() -> dict:
                async with web.get("/metrics") as response:
                    assert response.status == 200 and response.content_type == "text/plain"
                    text = await response.text()
                    assert not any(job_id in text for job_id in job_ids)
                    return read(text)

            found = await worker_metrics()
            assert value(found, "ferry_jobs_completed_total", request_type=chat, provider="openai") == 3
            assert value(found, "ferry_jobs_completed_total", request_type=embed, provider="openai") == 1
            assert value(found, "ferry_jobs_failed_total", request_type=chat, provider="openai") == 1
            assert total(found, "ferry_jobs_completed_total") == 4 and total(found, "ferry_jobs_failed_total") == 1
            assert value(found, "ferry_provider_calls_total", provider="openai", status_code="200") == 4
            assert value(found, "ferry_provider_calls_total", provider="openai", status_code="500") == 2
            assert total(found, "ferry_provider_calls_total") == 6 == len(fake_openai.requests)
            assert value(found, "ferry_provider_retries_total", provider="openai") == 1
            # Histogram counts equal the jobs and calls they measured.
            assert total(found, "ferry_provider_call_duration_seconds_count") == 6
            assert value(found, "ferry_provider_call_duration_seconds_bucket", provider="openai", request_type=chat,
                         le="+Inf") == 5
            assert value(found, "ferry_job_queue_wait_seconds_count", request_type=chat) == 4
            assert value(found, "ferry_job_queue_wait_seconds_count", request_type=embed) == 1
            assert value(found, "ferry_job_duration_seconds_count", request_type=chat, status="completed") == 3
            assert value(found, "ferry_job_duration_seconds_count", request_type=chat, status="failed") == 1
            assert value(found, "ferry_job_duration_seconds_count", request_type=embed, status="completed") == 1
            assert value(found, "ferry_provider_calls_in_flight", provider="openai") == 0
            assert value(found, "ferry_worker_jobs_in_flight") == 0
            assert value(found, "ferry_worker_possible_duplicate_calls_total") == 0
            assert value(found, "ferry_worker_duplicate_outcomes_total") == 0
            assert value(found, "ferry_jobs_dead_lettered_total") == 0
            assert {labels for (name, labels) in found if name == "ferry_worker_consumer_lag"} == \
                {frozenset({("request_type", request_type.value)}) for request_type in RequestType}

            async def no_lag() -> bool:  # Faust commits what it took within a second
                return total(await worker_metrics(), "ferry_worker_consumer_lag") == 0

            await wait_until(no_lag, 30, "the consumer lag to be 0 once every request was taken")
    finally:
        await api.close()


@pytest.mark.timeout(240)
async def test_consumer_lag_counts_the_requests_waiting_in_kafka(ferry_settings: Settings, fake_openai) -> None:
    # One call at a time, each slow: the other requests wait in Kafka, untaken.
    port = free_port()
    settings = ferry_settings.model_copy(update={"worker_web_port": port, "worker_max_in_flight": 1})
    fake_openai.latency = 1.0
    api = await start_api(settings)
    try:
        async with worker_with_web(settings), aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as web:
            job_ids = [(await submit(api, HELLO))["id"] for _ in range(4)]

            async def lag() -> float:
                async with web.get("/metrics") as response:
                    found = read(await response.text())
                assert total(found, "ferry_worker_consumer_lag") == \
                    value(found, "ferry_worker_consumer_lag", request_type="chat_completion")
                return value(found, "ferry_worker_consumer_lag", request_type="chat_completion")

            await wait_until(lambda: _at_least(lag, 2), 60, "requests waiting in Kafka to show as lag")
            for job_id in job_ids:
                assert (await poll_until_done(api, job_id))["status"] == "completed"
            await wait_until(lambda: _at_most(lag, 0), 30, "the lag to fall to 0")
    finally:
        await api.close()


async def _at_least(read_value, floor: float) -> bool:
    return await read_value() >= floor


async def _at_most(read_value, ceiling: float) -> bool:
    return await read_value() <= ceiling
