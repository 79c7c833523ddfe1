"""Chat completions end to end: API -> Kafka -> Faust worker -> fake provider -> table -> GET."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletion

from tests.conftest import PROVIDER_KEY, wait_until

CHAT = "/v1/async/chat/completions"


async def submit(api, body: dict, headers: dict | None = None) -> dict:
    response = await api.post(CHAT, json=body, headers=headers or {})
    assert response.status == 202, await response.text()
    return await response.json()


async def poll_until_done(api, job_id: str, path: str = CHAT, timeout: float = 60) -> dict:
    async def done():
        response = await api.get(f"{path}/{job_id}")
        if response.status == 200:
            return await response.json()
        assert response.status == 202, await response.text()
        return None

    return await wait_until(done, timeout, f"job {job_id} to finish")


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
