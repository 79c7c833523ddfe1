"""The OpenAI-compatible wire family: OpenAI itself, Groq, Together, OpenRouter, vLLM, Ollama...

Requests go to ``<base_url>/<path>`` with ``Authorization: Bearer <key>`` and the client's body
as is, with the target's model name; responses are already in OpenAI format. Errors follow
OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``; servers that answer
otherwise (a bare string, ``{"detail": ...}``, HTML) still give a readable message.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from app.jobs import RequestType
from app.providers import ProviderEndpoint
from workers.providers.base import HttpRequest, HttpResponse, ProviderFailure, retry_after_seconds

PATHS = {
    RequestType.chat_completion: "/chat/completions",
}


class OpenAICompatAdapter:
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any]) -> HttpRequest:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        return HttpRequest("POST", endpoint.base_url + PATHS[request_type], headers, {**body, "model": model})

    def parse_result(self, request_type: RequestType, response: HttpResponse) -> dict[str, Any]:
        result = orjson.loads(response.body)
        if not isinstance(result, dict):
            raise ValueError("the provider answered 2xx with a body that is not a JSON object")
        return result

    def parse_failure(self, response: HttpResponse) -> ProviderFailure:
        retry_after = retry_after_seconds(response.headers)
        try:
            body = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            return ProviderFailure(
                status_code=response.status,
                message=str(error.get("message") or f"provider answered {response.status}"),
                type=error.get("type"), code=None if code is None else str(code),
                param=error.get("param"), retry_after_seconds=retry_after,
            )
        if isinstance(error, str):
            message = error
        elif isinstance(body, dict) and body.get("detail"):
            message = str(body["detail"])
        else:
            message = response.body[:500].decode(errors="replace").strip() or f"provider answered {response.status}"
        return ProviderFailure(status_code=response.status, message=message, retry_after_seconds=retry_after)
