"""The OpenAI-compatible wire family: OpenAI itself, Groq, Together, Mistral, vLLM, Ollama...

Requests go to ``<base_url><path>`` with ``Authorization: Bearer <key>`` and the client's body
as is, with the target's model name (a multipart form for transcriptions and image edits and
variations, its files as they came). Responses are already in OpenAI format, except two that
are not JSON: speech audio becomes ``{"audio": <base64>, "content_type": ...}``, and a
transcription in ``text``/``srt``/``vtt`` becomes ``{"text": ...}``. Errors follow OpenAI's
shape, ``{"error": {"message", "type", "code", "param"}}`` (Mistral's flat ``{"message", "type"}``
too); servers that answer otherwise (a bare string, ``{"detail": ...}``, HTML) still give a
readable message.

Mistral's OCR (``/ocr``) and the rerank endpoint of Together and vLLM (``/rerank``) are the
family's only non-OpenAI paths; their bodies pass through in the provider's own format.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from app.jobs import RequestType, UploadedFile
from app.providers import ProviderEndpoint
from workers.providers.base import (
    HttpRequest,
    HttpResponse,
    ProviderFailure,
    json_object,
    json_or_none,
    retry_after_seconds,
    text_failure,
)

R = RequestType
PATHS = {
    R.text_completion: "/completions",
    R.chat_completion: "/chat/completions",
    R.responses: "/responses",
    R.embedding: "/embeddings",
    R.speech: "/audio/speech",
    R.transcription: "/audio/transcriptions",
    R.image_generation: "/images/generations",
    R.image_edit: "/images/edits",
    R.image_variation: "/images/variations",
    R.rerank: "/rerank",
    R.ocr: "/ocr",
}


def speech_result(response: HttpResponse) -> dict[str, Any]:
    """Audio bytes as the contract's JSON speech result."""
    content_type = response.headers.get("content-type", "application/octet-stream")
    return {"audio": base64.b64encode(response.body).decode("ascii"), "content_type": content_type}


def openai_result(request_type: RequestType, response: HttpResponse) -> dict[str, Any]:
    """An OpenAI-format 2xx body as a result object (Azure's are the same)."""
    if request_type is R.speech:
        return speech_result(response)
    content_type = response.headers.get("content-type", "")
    if request_type is R.transcription and "json" not in content_type:
        return {"text": response.body.decode("utf-8", errors="replace")}  # response_format text, srt, vtt
    return json_object(response)


def openai_failure(response: HttpResponse) -> ProviderFailure:
    """OpenAI's error body, ``{"error": {...}}``, and the looser shapes compatible servers use."""
    body = json_or_none(response.body)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) and isinstance(body, dict) and isinstance(body.get("message"), str):
        error = body  # Mistral's flat shape: {"object": "error", "message", "type", "param", "code"}
    if isinstance(error, dict):
        code = error.get("code")
        return ProviderFailure(
            status_code=response.status,
            message=str(error.get("message") or f"provider answered {response.status}"),
            type=error.get("type"), code=None if code is None else str(code),
            param=error.get("param"), retry_after_seconds=retry_after_seconds(response.headers),
        )
    if isinstance(error, str):
        return text_failure(response, error)
    if isinstance(body, dict):
        return text_failure(response, body.get("detail"))
    return text_failure(response)


def build_http_request(url: str, auth: dict[str, str], model: str | None, body: Mapping[str, Any],
                       files: Sequence[UploadedFile]) -> HttpRequest:
    """A JSON request, or a multipart form when there are files, with the target's model set
    (``None``: the URL names the model, as Azure's does); ``auth`` is the key's header."""
    fields = dict(body) if model is None else {**body, "model": model}
    if files:
        parts = [(upload.field, (upload.filename, upload.data, upload.content_type)) for upload in files]
        return HttpRequest("POST", url, {"Accept": "application/json", **auth}, data=fields, files=parts)
    return HttpRequest("POST", url, {"Content-Type": "application/json", "Accept": "application/json", **auth},
                       json=fields)


class OpenAICompatAdapter:
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any], files: Sequence[UploadedFile] = ()) -> HttpRequest:
        auth = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        return build_http_request(endpoint.base_url + PATHS[request_type], auth, model, body, files)

    def parse_result(self, request_type: RequestType, response: HttpResponse, *, model: str,
                     body: Mapping[str, Any]) -> dict[str, Any]:
        return openai_result(request_type, response)

    def parse_failure(self, response: HttpResponse) -> ProviderFailure:
        return openai_failure(response)
