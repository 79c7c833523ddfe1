"""Each adapter's requests against its provider's fake over real HTTP, and the raw answers
checked with the official SDK models: the fakes speak the wire format the SDKs expect."""

from __future__ import annotations

import dataclasses

import aiohttp
import anthropic.types
import openai.types.chat

from app.jobs import RequestType
from app.providers import ANTHROPIC, ProviderEndpoint
from deploy.fakes.anthropic_server import FakeAnthropic
from deploy.fakes.openai_server import FakeOpenAI
from workers import caller
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.base import HttpRequest, HttpResponse
from workers.providers.openai_compat import OpenAICompatAdapter

KEY = "sk-ant-test-0123"
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        "max_tokens": 32, "n": 1, "presence_penalty": 0.5}


async def send(request: HttpRequest) -> HttpResponse:
    """Sent as the worker sends it (``workers.caller.send``)."""
    async with aiohttp.ClientSession() as session:
        return await caller.send(session, request)


def endpoint(name: str, base_url: str) -> ProviderEndpoint:
    return ProviderEndpoint(name=name, family=name, base_url=base_url, api_key=KEY, timeout_seconds=5,
                            request_types=frozenset({RequestType.chat_completion}))


async def test_anthropic_adapter_against_the_fake() -> None:
    fake = await FakeAnthropic(api_key=KEY).start()
    adapter = AnthropicAdapter()
    try:
        request = adapter.build_request(endpoint(ANTHROPIC, fake.base_url), RequestType.chat_completion,
                                        "claude-haiku-4-5", CHAT)
        reply = await send(request)
        assert reply.status == 200, reply.body  # the fake refuses unknown fields: n, presence_penalty were dropped
        message = anthropic.types.Message.model_validate_json(reply.body)
        assert message.content[0].text == "echo: hello" and message.stop_reason == "end_turn"
        completion = openai.types.chat.ChatCompletion.model_validate(
            adapter.parse_result(RequestType.chat_completion, reply, model="claude-haiku-4-5", body=CHAT))
        assert completion.choices[0].message.content == "echo: hello"
        assert completion.usage.completion_tokens == message.usage.output_tokens

        fake.fail_next = [(429, 2.0)]
        failure = adapter.parse_failure(await send(request))
        assert (failure.status_code, failure.type, failure.retry_after_seconds) == (429, "rate_limit_error", 2.0)
        wrong_key = dataclasses.replace(endpoint(ANTHROPIC, fake.base_url), api_key="sk-wrong")
        failure = adapter.parse_failure(await send(adapter.build_request(wrong_key, RequestType.chat_completion,
                                                                         "claude-haiku-4-5", CHAT)))
        assert (failure.status_code, failure.type, failure.retryable) == (401, "authentication_error", False)
        assert KEY not in failure.message
    finally:
        await fake.stop()


async def test_openai_adapter_against_the_fake() -> None:
    fake = await FakeOpenAI(api_key=KEY).start()
    adapter = OpenAICompatAdapter()
    try:
        request = adapter.build_request(endpoint("openai", fake.base_url), RequestType.chat_completion,
                                        "gpt-4o-mini", CHAT)
        reply = await send(request)
        completion = openai.types.chat.ChatCompletion.model_validate(
            adapter.parse_result(RequestType.chat_completion, reply, model="gpt-4o-mini", body=CHAT))
        assert completion.choices[0].message.content == "echo: hello"
        fake.fail_next = [(503, 1.5)]
        failure = adapter.parse_failure(await send(request))
        assert (failure.status_code, failure.type, failure.retryable, failure.retry_after_seconds) == \
            (503, "server_error", True, 1.5)
    finally:
        await fake.stop()
