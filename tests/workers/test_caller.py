"""The provider caller against fake providers on loopback: which failures move a job to its next
target and which end it, the job deadline, and Retry-After given as an HTTP date."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from email.utils import formatdate, parsedate_to_datetime

import pytest

from app.jobs import JobRequest, Outcome, RequestType, RetryInfo, Target, utcnow
from app.settings import Settings
from deploy.fakes.anthropic_server import FakeAnthropic
from deploy.fakes.openai_server import FakeOpenAI
from workers.caller import ProviderCaller

KEY = "sk-test-provider-key-0123456789"
HELLO = [{"role": "user", "content": "hello"}]
AUDIO = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]
R = RequestType


def job(*targets: str, body: dict | None = None, request_type: RequestType = R.chat_completion) -> JobRequest:
    return JobRequest(id=str(uuid.uuid4()), request_type=request_type, created_at=utcnow(), ttl_seconds=60,
                      targets=[Target.parse(name) for name in targets], body=body or {"messages": HELLO})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def primary() -> FakeOpenAI:
    fake = await FakeOpenAI(api_key=KEY).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def backup() -> FakeOpenAI:
    fake = await FakeOpenAI(api_key=KEY).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def anthropic() -> FakeAnthropic:
    fake = await FakeAnthropic(api_key=KEY).start()
    yield fake
    await fake.stop()


async def run(request: JobRequest, providers: dict, retries: list[RetryInfo] | None = None, **settings) -> Outcome:
    """The job's outcome from a caller with these providers and settings (one call per target by default)."""
    values = {"retry_max_attempts": 1, "retry_initial_backoff_seconds": 0.01, "retry_max_backoff_seconds": 60.0}
    caller = ProviderCaller(Settings(providers=providers, **(values | settings)))
    await caller.start()

    async def on_retry(retry: RetryInfo) -> None:
        if retries is not None:
            retries.append(retry)

    try:
        return await caller.run(request, on_retry=on_retry)
    finally:
        await caller.stop()


def openai_compatible(fake: FakeOpenAI, key: str = KEY, **extra) -> dict:
    return {"base_url": fake.base_url, "api_key": key, "timeout_seconds": 5} | extra


def served_by(outcome: Outcome, provider: str) -> None:
    assert outcome.status_code == 200 and outcome.error is None, outcome
    assert outcome.result["extra_fields"]["provider"] == provider
    assert outcome.result["choices"][0]["message"]["content"] == "echo: hello"


# -- fallbacks: what moves a job to its next target --------------------------------------------------------

@pytest.mark.parametrize("status", [429, 500, 502, 503, 529])
async def test_a_provider_overloaded_or_failing_moves_to_the_next_target(primary, backup, status) -> None:
    primary.fail_next = [(status, None)]
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary), "backup": openai_compatible(backup)})
    served_by(outcome, "backup")
    assert (primary.calls, backup.calls) == (1, 1)


async def test_a_provider_timeout_moves_to_the_next_target(primary, backup) -> None:
    primary.latency = 2.0
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary, timeout_seconds=0.3),
                         "backup": openai_compatible(backup)})
    served_by(outcome, "backup")


async def test_an_unreachable_provider_moves_to_the_next_target(backup) -> None:
    outcome = await run(job("gone/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"gone": {"base_url": f"http://127.0.0.1:{closed_port()}/v1"},
                         "backup": openai_compatible(backup)})
    served_by(outcome, "backup")


async def test_a_provider_not_configured_at_this_worker_moves_to_the_next_target(backup) -> None:
    # Accepted at submit by an API whose configuration had the provider; this worker's has not.
    outcome = await run(job("retired/gpt-4o-mini", "backup/gpt-4o-mini"), {"backup": openai_compatible(backup)})
    served_by(outcome, "backup")


async def test_a_body_the_provider_cannot_express_moves_to_the_next_target(anthropic, backup) -> None:
    outcome = await run(job("anthropic/claude-sonnet-4-5", "backup/gpt-4o-mini", body={"messages": AUDIO}),
                        {"anthropic": openai_compatible(anthropic) | {"base_url": anthropic.base_url},
                         "backup": openai_compatible(backup)})
    assert outcome.status_code == 200 and outcome.result["extra_fields"]["provider"] == "backup"
    assert anthropic.calls == 0  # refused before any call


async def test_a_2xx_answer_that_is_not_the_providers_format_moves_to_the_next_target(primary, backup) -> None:
    primary.garbage_next = 1
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary), "backup": openai_compatible(backup)})
    served_by(outcome, "backup")
    assert primary.calls == 1


async def test_a_result_too_large_to_store_moves_to_the_next_target(primary, backup) -> None:
    body = {"input": ["hello"] * 100}  # about 6 KB of floats from either
    outcome = await run(job("openai/text-embedding-3-small", "backup/text-embedding-3-small", body=body,
                            request_type=R.embedding),
                        {"openai": openai_compatible(primary), "backup": openai_compatible(backup)},
                        max_result_bytes=1024)
    assert (primary.calls, backup.calls) == (1, 1)
    # Every target failed: the job's error is the last one's.
    assert outcome.status_code == 502 and outcome.error.is_bifrost_error
    assert outcome.error.error.message.startswith("provider result too large")
    assert outcome.error.extra_fields["provider"] == "backup"


# As read from a secret file that ends with a newline, or pasted with a typographic quote.
@pytest.mark.parametrize("bad_key", [KEY + "\n", KEY + " ", KEY + "\u2019"])
async def test_a_key_that_is_not_a_valid_header_moves_to_the_next_target_and_is_never_shown(
        primary, backup, caplog, bad_key) -> None:
    caplog.set_level(logging.DEBUG)
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary, key=bad_key), "backup": openai_compatible(backup)})
    served_by(outcome, "backup")
    assert primary.calls == 0
    assert "not valid HTTP" in caplog.text and KEY not in caplog.text
    assert KEY not in outcome.model_dump_json()


async def test_the_last_targets_error_when_none_serves(primary, backup) -> None:
    primary.fail_next, backup.fail_next = [(503, None)], [(429, None)]
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary), "backup": openai_compatible(backup)})
    assert outcome.status_code == 429 and not outcome.error.is_bifrost_error
    assert outcome.error.extra_fields["provider"] == "backup"


# -- fallbacks: what ends the job -------------------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_a_providers_own_refusal_ends_the_job(primary, backup, status) -> None:
    primary.fail_next = [(status, None)]
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary), "backup": openai_compatible(backup)},
                        retry_max_attempts=3)
    assert outcome.status_code == status and outcome.error.is_bifrost_error is False
    assert outcome.error.extra_fields["provider"] == "openai"
    assert (primary.calls, backup.calls) == (1, 0)


async def test_a_wrong_provider_key_ends_the_job_and_is_never_shown(primary, backup, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-key-9876543210"
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary, key=wrong), "backup": openai_compatible(backup)})
    assert outcome.status_code == 401 and backup.calls == 0
    assert wrong not in outcome.model_dump_json() and wrong not in caplog.text


# -- the job deadline -------------------------------------------------------------------------------------

async def test_the_deadline_cuts_a_slow_call_and_ends_the_job(primary, backup) -> None:
    primary.latency = 3.0  # past the deadline, well within the provider timeout
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary, timeout_seconds=60), "backup": openai_compatible(backup)},
                        job_deadline_seconds=0.5)
    assert outcome.status_code == 504 and outcome.error.is_bifrost_error
    assert outcome.error.error.message == "job deadline of 0.5 s exceeded after 1 call"
    assert outcome.error.error.type == "job_deadline_exceeded"
    assert outcome.error.extra_fields["provider"] == "openai"
    assert backup.calls == 0


async def test_the_deadline_ends_a_job_that_keeps_failing(primary) -> None:
    primary.fail_next = [(503, None)] * 1000
    retries: list[RetryInfo] = []
    outcome = await run(job("openai/gpt-4o-mini"), {"openai": openai_compatible(primary)}, retries,
                        job_deadline_seconds=1.0, retry_max_attempts=1000, retry_initial_backoff_seconds=0.02,
                        retry_max_backoff_seconds=0.1)
    assert outcome.status_code == 504 and outcome.error.is_bifrost_error
    calls = primary.calls
    assert 1 < calls < 1000 and len(retries) in (calls - 1, calls)
    exceeded = f"job deadline of 1 s exceeded after {calls} calls"
    assert outcome.error.error.message in (f"{exceeded}; the last failed with 503", exceeded)


async def test_a_retry_wait_past_the_deadline_moves_to_the_next_target_at_once(primary, backup) -> None:
    primary.fail_next = [(429, 30.0)]  # Retry-After: 30, beyond the deadline
    retries: list[RetryInfo] = []
    outcome = await run(job("openai/gpt-4o-mini", "backup/gpt-4o-mini"),
                        {"openai": openai_compatible(primary), "backup": openai_compatible(backup)}, retries,
                        job_deadline_seconds=10, retry_max_attempts=3)
    served_by(outcome, "backup")
    assert (primary.calls, retries) == (1, [])


async def test_a_retry_wait_past_the_deadline_on_the_last_target_ends_the_job(primary) -> None:
    primary.fail_next = [(429, 30.0)]
    outcome = await run(job("openai/gpt-4o-mini"), {"openai": openai_compatible(primary)},
                        job_deadline_seconds=10, retry_max_attempts=3)
    assert outcome.status_code == 504
    assert outcome.error.error.message == "job deadline of 10 s exceeded after 1 call; the last failed with 429"
    assert primary.calls == 1


async def test_the_deadline_bounds_the_wait_for_a_providers_limits(primary) -> None:
    # One call start a minute: the second job would wait a minute for its turn.
    providers = {"openai": openai_compatible(primary, requests_per_minute=1)}
    caller = ProviderCaller(Settings(providers=providers, job_deadline_seconds=0.5, http_max_connections=25))
    await caller.start()
    try:
        first, second = await asyncio.gather(caller.run(job("openai/gpt-4o-mini")),
                                             caller.run(job("openai/gpt-4o-mini")))
    finally:
        await caller.stop()
    assert sorted([first.status_code, second.status_code]) == [200, 504]
    late = first if first.status_code == 504 else second
    assert late.error.error.message == "job deadline of 0.5 s exceeded after 0 calls"
    assert primary.calls == 1


# -- Retry-After as an HTTP date --------------------------------------------------------------------------

async def test_a_retry_after_http_date_is_waited_for(primary) -> None:
    retry_at = formatdate(time.time() + 3, usegmt=True)  # whole seconds: 2 to 3 s from now
    primary.fail_next = [(429, retry_at)]
    retries: list[RetryInfo] = []
    outcome = await run(job("openai/gpt-4o-mini"), {"openai": openai_compatible(primary)}, retries,
                        retry_max_attempts=2, retry_initial_backoff_seconds=0.01)
    assert outcome.status_code == 200 and primary.calls == 2
    [retry] = retries
    assert retry.status_code == 429 and retry.attempt == 1
    # The backoff alone would have been 10 ms at most; the retry was planned for the provider's date.
    assert (retry.next_attempt_at - parsedate_to_datetime(retry_at)).total_seconds() >= -0.005
