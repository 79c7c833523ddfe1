"""Cohere (API v2): rerank and embeddings, keyed with ``Authorization: Bearer``.

Rerank: ``POST <base_url>/v2/rerank``. Ferry's rerank body is the common one (Cohere's, Jina's,
Together's): ``{"query", "documents": [str | {"text"}], "top_n", "return_documents"}``, plus
Cohere's ``max_tokens_per_doc``, passed through; other fields are dropped. The result
is ``{"id", "object": "list", "model", "results": [{"index", "relevance_score", "document"?}],
"usage": {"search_units"}}``. Cohere v2 no longer returns documents, so Ferry adds them back
from the request when ``return_documents`` is true.

Embeddings: ``POST <base_url>/v2/embed`` with ``texts`` (from ``input``), ``input_type``
(default ``search_document``, since Cohere requires one), ``output_dimension`` (from
``dimensions``) and float embeddings; Cohere's ``truncate`` and ``max_tokens`` pass through,
other fields are dropped. Answered as an OpenAI embedding list with the billed input tokens as
usage.

Errors are ``{"id"?, "message"}`` with the HTTP status telling the kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.jobs import RequestType, UploadedFile
from app.providers import ProviderEndpoint
from workers.providers.base import (
    HttpRequest,
    HttpResponse,
    ProviderFailure,
    UnsupportedRequest,
    json_headers,
    json_object,
    json_or_none,
    text_failure,
)

R = RequestType
DEFAULT_INPUT_TYPE = "search_document"


def _document_text(document: Any) -> str:
    if isinstance(document, str):
        return document
    text = document.get("text") if isinstance(document, dict) else None
    if isinstance(text, str):
        return text
    raise UnsupportedRequest("rerank documents must be strings or objects with a text field")


def to_rerank(model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "query": body["query"],
                               "documents": [_document_text(doc) for doc in body["documents"]]}
    for name in ("top_n", "max_tokens_per_doc"):
        if body.get(name) is not None:
            request[name] = body[name]
    return request


def to_rerank_result(answer: Mapping[str, Any], model: str, documents: Sequence[Any] | None) -> dict[str, Any]:
    results = []
    for item in answer.get("results") or []:
        result = {"index": item["index"], "relevance_score": item["relevance_score"]}
        if documents is not None:
            result["document"] = {"text": _document_text(documents[item["index"]])}
        results.append(result)
    billed = (answer.get("meta") or {}).get("billed_units") or {}
    return {"id": answer.get("id"), "object": "list", "model": model, "results": results,
            "usage": {"search_units": billed.get("search_units", 0)}}


def to_embed(model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    inputs = body["input"]
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not all(isinstance(text, str) for text in texts):
        raise UnsupportedRequest("cohere embeddings take text inputs only, not token arrays")
    request: dict[str, Any] = {"model": model, "texts": texts, "embedding_types": ["float"],
                               "input_type": body.get("input_type") or DEFAULT_INPUT_TYPE}
    if body.get("dimensions"):
        request["output_dimension"] = body["dimensions"]
    for name in ("truncate", "max_tokens"):  # Cohere's own
        if body.get(name) is not None:
            request[name] = body[name]
    return request


def to_embedding_list(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    vectors = (answer.get("embeddings") or {}).get("float") or []
    tokens = ((answer.get("meta") or {}).get("billed_units") or {}).get("input_tokens", 0)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": vector} for index, vector in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class CohereAdapter:
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any], files: Sequence[UploadedFile] = ()) -> HttpRequest:
        if request_type is R.rerank:
            path, payload = "/v2/rerank", to_rerank(model, body)
        elif request_type is R.embedding:
            path, payload = "/v2/embed", to_embed(model, body)
        else:
            raise UnsupportedRequest(f"cohere does not support {request_type.value} requests")
        headers = json_headers("Authorization", endpoint.api_key, "Bearer ")
        return HttpRequest("POST", endpoint.base_url + path, headers, json=payload)

    def parse_result(self, request_type: RequestType, response: HttpResponse, *, model: str,
                     body: Mapping[str, Any]) -> dict[str, Any]:
        answer = json_object(response)
        if request_type is R.embedding:
            return to_embedding_list(answer, model)
        return to_rerank_result(answer, model, body["documents"] if body.get("return_documents") else None)

    def parse_failure(self, response: HttpResponse) -> ProviderFailure:
        body = json_or_none(response.body)
        return text_failure(response, body.get("message") if isinstance(body, dict) else None)
