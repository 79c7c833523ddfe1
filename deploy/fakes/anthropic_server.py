"""A fake Anthropic Messages API on loopback.

``POST /v1/messages`` with ``x-api-key`` and ``anthropic-version``; the body is checked as the
real API checks it (``max_tokens`` and ``messages`` required, alternating roles starting with
``user``, no unknown fields, no ``system`` role inside ``messages``), and answered with a real
``Message`` object: an echo of the last user text, or a ``tool_use`` block when tools are
offered and the last user text says ``use <tool name>``. Errors are Anthropic's
``{"type": "error", "error": {"type", "message"}}``, 529 ``overloaded_error`` included.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from deploy.fakes.base import FakeProvider

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}
MESSAGES = {401: "invalid x-api-key", 429: "Number of request tokens has exceeded your per-minute rate limit",
            500: "Internal server error", 529: "Overloaded"}
KNOWN_FIELDS = {"model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences",
                "tools", "tool_choice", "metadata", "stream", "thinking", "service_tier", "container",
                "mcp_servers"}


@dataclass
class FakeAnthropic(FakeProvider):
    @property
    def base_url(self) -> str:
        return self.root_url

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self._messages)

    def authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("x-api-key") == self.api_key

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        kind = ERROR_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message or MESSAGES.get(status, kind)}}
        return web.json_response(body, status=status, headers=self.retry_after_header(retry_after))

    def _invalid(self, body: dict[str, Any]) -> str | None:
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            return f"{unknown[0]}: Extra inputs are not permitted"
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return f"{name}: Field required"
        roles = [message.get("role") for message in body["messages"]]
        if not roles or roles[0] != "user":
            return "messages: first message must use the \"user\" role"
        if any(role not in ("user", "assistant") for role in roles):
            return "messages: Unexpected role. The Messages API accepts a top-level `system` parameter"
        if any(a == b for a, b in itertools.pairwise(roles)):
            return "messages: roles must alternate between \"user\" and \"assistant\""
        return None

    async def _messages(self, request: web.Request) -> web.Response:
        if not request.headers.get("anthropic-version"):
            return self.error(400, message="anthropic-version: header is required")
        admission = await self.admit(request)
        if admission.refusal is not None:
            return admission.refusal
        body = admission.body
        problem = self._invalid(body)
        if problem:
            return self.error(400, message=problem)
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(b.get("text", "") for b in last if b.get("type") == "text")
        number = self.next_id()
        tool = next((t for t in body.get("tools", []) if f"use {t['name']}" in text), None)
        if tool is not None:
            content = [{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": f"toolu_fake{number}", "name": tool["name"],
                        "input": {"query": text}}]
            stop_reason = "tool_use"
        else:
            content = [{"type": "text", "text": f"echo: {text}"}]
            stop_reason = "end_turn"
        input_tokens = sum(len(str(m).split()) for m in body["messages"]) + len(str(body.get("system", "")).split())
        return web.json_response({
            "id": f"msg_fake{number}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": len(text.split()) + 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        })
