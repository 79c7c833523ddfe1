"""The OpenAI-compatible adapter translates both ways without I/O."""

from __future__ import annotations

import orjson

from app.jobs import RequestType
from app.providers import OPENAI_COMPAT, ProviderEndpoint
from workers.providers.base import HttpResponse
from workers.providers.openai_compat import OpenAICompatAdapter

ENDPOINT = ProviderEndpoint(name="groq", family=OPENAI_COMPAT, base_url="https://api.groq.com/openai/v1",
                            api_key="gsk-secret", timeout_seconds=30, request_types=frozenset(RequestType))
adapter = OpenAICompatAdapter()


def test_build_request_sets_path_key_and_model() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}
    request = adapter.build_request(ENDPOINT, RequestType.chat_completion, "llama-3.3-70b", body)
    assert request.method == "POST"
    assert request.url == "https://api.groq.com/openai/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer gsk-secret"
    assert request.json == {**body, "model": "llama-3.3-70b"}
    assert "gsk-secret" not in repr(request)


def test_keyless_endpoint_sends_no_authorization() -> None:
    keyless = ProviderEndpoint(name="vllm", family=OPENAI_COMPAT, base_url="http://gpu:8000/v1", api_key=None,
                               timeout_seconds=30, request_types=frozenset(RequestType))
    request = adapter.build_request(keyless, RequestType.chat_completion, "m", {"messages": []})
    assert "Authorization" not in request.headers


def test_parse_result_returns_the_provider_object() -> None:
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
    response = HttpResponse(200, {}, orjson.dumps(completion))
    assert adapter.parse_result(RequestType.chat_completion, response, model="m", body={}) == completion


def test_parse_failure_reads_openai_error_and_retry_after() -> None:
    body = {"error": {"message": "Rate limit reached", "type": "requests", "param": None,
                      "code": "rate_limit_exceeded"}}
    failure = adapter.parse_failure(HttpResponse(429, {"retry-after": "20"}, orjson.dumps(body)))
    assert (failure.status_code, failure.message, failure.type, failure.code) == (
        429, "Rate limit reached", "requests", "rate_limit_exceeded")
    assert failure.retry_after_seconds == 20 and failure.retryable


def test_parse_failure_of_non_openai_bodies() -> None:
    detail = adapter.parse_failure(HttpResponse(422, {}, b'{"detail": "model not loaded"}'))
    assert detail.message == "model not loaded" and not detail.retryable
    html = adapter.parse_failure(HttpResponse(502, {}, b"<html>Bad gateway</html>"))
    assert html.message == "<html>Bad gateway</html>" and html.retryable
    empty = adapter.parse_failure(HttpResponse(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b""))
    assert empty.message == "provider answered 503" and empty.retry_after_seconds == 0.0  # a date in the past
