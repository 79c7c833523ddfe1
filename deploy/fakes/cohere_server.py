"""A fake Cohere API (v2) on loopback: ``/v2/rerank`` and ``/v2/embed``.

``Authorization: Bearer <key>``; bodies are checked as Cohere checks them (required fields,
``input_type`` required for v3+ embed models, unknown fields refused); answers are Cohere's v2
objects with ``meta.billed_units``; errors are ``{"id", "message"}``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from aiohttp import web

from deploy.fakes.base import FakeProvider
from deploy.fakes.openai_server import vector

MESSAGES = {401: "invalid api token", 429: "You are using a Trial key, which is limited to 10 API calls / minute. "
            "You can continue to use the Trial key for free or upgrade to a Production key with higher rate limits "
            "at 'https://dashboard.cohere.com/api-keys'.", 500: "internal server error, this has been reported "
            "to our developers", 503: "service unavailable"}
RERANK_FIELDS = {"model", "query", "documents", "top_n", "max_tokens_per_doc"}
EMBED_FIELDS = {"model", "texts", "images", "inputs", "input_type", "embedding_types", "output_dimension",
                "truncate", "max_tokens"}
META = {"api_version": {"version": "2"}}


@dataclass
class FakeCohere(FakeProvider):
    @property
    def base_url(self) -> str:
        return self.root_url

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v2/rerank", self._rerank)
        router.add_post("/v2/embed", self._embed)

    def authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        body = {"id": str(uuid.uuid4()), "message": message or MESSAGES.get(status, "invalid request")}
        return web.json_response(body, status=status, headers=self.retry_after_header(retry_after))

    async def _checked(self, request: web.Request, known: set[str], required: tuple[str, ...]):
        """The admitted body, or the answer to give instead: a scripted failure or Cohere's 400."""
        admission = await self.admit(request)
        if admission.refusal is not None:
            return None, admission.refusal
        body = admission.body
        unknown = sorted(set(body) - known)
        if unknown:
            return None, self.error(400, message=f"invalid request: unknown field {unknown[0]!r}")
        for name in required:
            if not body.get(name):
                return None, self.error(400, message=f"invalid request: {name} is required")
        return body, None

    async def _rerank(self, request: web.Request) -> web.Response:
        body, refusal = await self._checked(request, RERANK_FIELDS, ("model", "query", "documents"))
        if refusal is not None:
            return refusal
        if not all(isinstance(doc, str) for doc in body["documents"]):
            return self.error(400, message="invalid request: documents must be a list of strings")
        query = set(body["query"].lower().split())
        results = sorted(({"index": i, "relevance_score": round(len(query & set(d.lower().split())) /
                                                                 (len(d.split()) or 1), 6)}
                          for i, d in enumerate(body["documents"])), key=lambda r: -r["relevance_score"])
        return web.json_response({"id": str(uuid.uuid4()), "results": results[: body.get("top_n") or len(results)],
                                  "meta": META | {"billed_units": {"search_units": 1}}})

    async def _embed(self, request: web.Request) -> web.Response:
        body, refusal = await self._checked(request, EMBED_FIELDS, ("model", "texts", "input_type"))
        if refusal is not None:
            return refusal
        dimensions = int(body.get("output_dimension") or 8)
        return web.json_response({
            "id": str(uuid.uuid4()), "response_type": "embeddings_by_type", "texts": body["texts"],
            "embeddings": {"float": [vector(text, dimensions) for text in body["texts"]]},
            "meta": META | {"billed_units": {"input_tokens": sum(len(t.split()) for t in body["texts"])}},
        })
