"""A fake Gemini (Generative Language API) on loopback.

``POST /v1beta/models/<model>:generateContent`` and ``:batchEmbedContents`` with
``x-goog-api-key`` (or ``?key=``). Bodies are checked as the real API checks them (``contents``
required, roles ``user``/``model`` only, unknown fields refused) and answered with real
response objects: an echo of the last user text (or a ``functionCall`` when function
declarations are offered and the text says ``use <name>``), and deterministic embeddings.
Errors are Google's ``{"error": {"code", "message", "status"}}``; a bad key is a 400
``INVALID_ARGUMENT``, as Google answers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from deploy.fakes.base import FakeProvider
from deploy.fakes.openai_server import vector

STATUSES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
            500: "INTERNAL", 503: "UNAVAILABLE"}
MESSAGES = {429: "Resource has been exhausted (e.g. check quota).", 500: "An internal error has occurred.",
            503: "The model is overloaded. Please try again later."}
KNOWN_FIELDS = {"contents", "systemInstruction", "generationConfig", "tools", "toolConfig", "safetySettings",
                "cachedContent"}


@dataclass
class FakeGemini(FakeProvider):
    @property
    def base_url(self) -> str:
        return self.root_url

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1beta/models/{call}", self._call)

    def authorized(self, request: web.Request) -> bool:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        return self.api_key is None or key == self.api_key

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        if status == 401:  # Google answers a bad key with 400
            status, message = 400, "API key not valid. Please pass a valid API key."
        body = {"error": {"code": status, "message": message or MESSAGES.get(status, "Request failed."),
                          "status": STATUSES.get(status, "UNKNOWN")}}
        return web.json_response(body, status=status, headers=self.retry_after_header(retry_after))

    async def _call(self, request: web.Request) -> web.Response:
        model, _, method = request.match_info["call"].partition(":")
        if method not in ("generateContent", "batchEmbedContents"):
            return self.error(404, message=f"Method {method!r} not found for model {model}.")
        admission = await self.admit(request)
        if admission.refusal is not None:
            return admission.refusal
        if method == "batchEmbedContents":
            return self._embed(model, admission.body)
        return self._generate(model, admission.body)

    def _generate(self, model: str, body: dict[str, Any]) -> web.Response:
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            return self.error(400, message=f'Invalid JSON payload received. Unknown name "{unknown[0]}": '
                                           "Cannot find field.")
        contents = body.get("contents")
        if not contents:
            return self.error(400, message="* GenerateContentRequest.contents: contents is not specified")
        if any(item.get("role") not in ("user", "model") for item in contents):
            return self.error(400, message="Please use a valid role: user, model.")
        text = " ".join(part.get("text", "") for part in contents[-1]["parts"])
        declarations = [d for tool in body.get("tools", []) for d in tool.get("functionDeclarations", [])]
        called = next((d for d in declarations if f"use {d['name']}" in text), None)
        parts = ([{"functionCall": {"name": called["name"], "args": {"query": text}}}] if called
                 else [{"text": f"echo: {text}"}])
        prompt = sum(len(str(item).split()) for item in contents)
        return web.json_response({
            "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": 3,
                              "totalTokenCount": prompt + 3},
            "modelVersion": model,
            "responseId": f"fake-{self.next_id()}",
        })

    def _embed(self, model: str, body: dict[str, Any]) -> web.Response:
        requests = body.get("requests")
        if not requests:
            return self.error(400, message="* BatchEmbedContentsRequest.requests: requests is not specified")
        for item in requests:
            if item.get("model") != f"models/{model}":
                return self.error(400, message=f"Model {item.get('model')} does not match models/{model}.")
        return web.json_response({"embeddings": [
            {"values": vector(" ".join(p.get("text", "") for p in item["content"]["parts"]),
                              int(item.get("outputDimensionality") or 8))}
            for item in requests]})
