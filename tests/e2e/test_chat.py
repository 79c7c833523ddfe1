"""Chat completions end to end: API -> Kafka -> Faust worker -> fake provider -> table -> GET."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletion

from tests.helpers import PROVIDER_KEY, ferry_settings_for, poll_until_done, start_api, submit, worker_running


@pytest.mark.timeout(120)
async def test_chat_job_completes(api, worker, fake_openai) -> None:
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0.2, "some_future_field": {"kept": [1, 2]}}
    accepted = await submit(api, body)
    assert set(accepted) == {"id", "status", "created_at"}
    assert accepted["status"] == "pending"

    job = await poll_until_done(api, accepted["id"])
    assert job["status"] == "completed"
    assert job["status_code"] == 200
    assert {"completed_at", "expires_at", "result"} <= set(job) and "error" not in job
    completion = ChatCompletion.model_validate(job["result"])
    assert completion.choices[0].message.content == "echo: hello"

    [received] = fake_openai.requests
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert received.body == {"model": "gpt-4o-mini", "messages": body["messages"], "temperature": 0.2,
                             "some_future_field": {"kept": [1, 2]}}


def assert_provider_failure(job: dict, status: int, message: str, model: str = "gpt-4o-mini",
                            provider: str = "openai") -> None:
    assert job["status"] == "failed"
    assert job["status_code"] == status
    assert "result" not in job
    error = job["error"]
    assert error["is_bifrost_error"] is False
    assert error["status_code"] == status
    assert error["error"]["message"] == message
    assert error["extra_fields"] == {"provider": provider, "model_requested": model,
                                     "request_type": "chat_completion"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("status", [400, 429, 500])
async def test_provider_error_fails_the_job(api, worker, status) -> None:
    from deploy.fakes.openai_server import ERRORS

    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
            "x_fake": {"status": status, "retry_after": 7}}
    job = await poll_until_done(api, (await submit(api, body))["id"])
    assert_provider_failure(job, status, ERRORS[status]["message"])
    assert job["error"]["error"]["type"] == ERRORS[status]["type"]


@pytest.mark.timeout(120)
async def test_wrong_provider_key_fails_with_401(settings, fake_openai) -> None:
    from deploy.fakes.openai_server import ERRORS

    wrong = ferry_settings_for(settings, fake_openai, providers={
        "corp": {"base_url": fake_openai.base_url, "api_key": "sk-wrong"}})
    api = await start_api(wrong)
    try:
        async with worker_running(wrong):
            body = {"model": "corp/llama-3", "messages": [{"role": "user", "content": "x"}]}
            job = await poll_until_done(api, (await submit(api, body))["id"])
    finally:
        await api.close()
    assert_provider_failure(job, 401, ERRORS[401]["message"], model="llama-3", provider="corp")
    assert job["error"]["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in str(job)


@pytest.mark.timeout(120)
async def test_provider_timeout_fails_with_504(api, worker) -> None:
    # The provider timeout is 5 s in these settings; the fake answers after 8.
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
            "x_fake": {"latency": 8}}
    job = await poll_until_done(api, (await submit(api, body))["id"])
    assert job["status"] == "failed" and job["status_code"] == 504
    assert job["error"]["is_bifrost_error"] is True
    assert job["error"]["error"]["message"] == "provider request timed out"
