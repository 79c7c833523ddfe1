"""Google Gemini (the Generative Language API): chat and embeddings, keyed with ``x-goog-api-key``.

Chat: ``POST <base_url>/v1beta/models/<model>:generateContent``. System messages become
``systemInstruction``; turns become ``contents`` with roles ``user`` and ``model``; text parts
stay text, ``data:`` image URLs become ``inlineData`` (other URLs ``fileData``); an assistant's
``tool_calls`` become ``functionCall`` parts and ``tool`` messages ``functionResponse`` parts
(named after the call they answer); ``temperature``, ``top_p``, ``n``, ``seed``, the penalties,
``max_tokens``/``max_completion_tokens``, ``stop`` and a JSON ``response_format`` go to
``generationConfig``; ``tools`` and ``tool_choice`` to ``tools``/``toolConfig``. The API's own
fields pass through as given (``PASSED_THROUGH``: ``safetySettings``, ``cachedContent``), and a
``generationConfig`` object in the body is merged over the translated one (its keys win:
``topK``, ``thinkingConfig``, ``responseSchema``...). Every other field is dropped: the API
refuses unknown ones with 400. The answer's candidates become choices, its ``usageMetadata``
the usage.

Embeddings: ``POST <base_url>/v1beta/models/<model>:batchEmbedContents``, one request per
input (``dimensions`` becomes ``outputDimensionality``, ``task_type`` ``taskType``; other fields
are dropped), answered as an OpenAI embedding list (Gemini reports no token counts for embeddings, so
the list has no ``usage``).

Errors are Google's ``{"error": {"code", "message", "status"}}``; ``status`` (``RESOURCE_EXHAUSTED``,
``INVALID_ARGUMENT``...) becomes the error's type.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import orjson

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
    retry_after_seconds,
    text_failure,
)

R = RequestType
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                  "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                  "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter"}
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "topP", "n": "candidateCount", "seed": "seed",
                     "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty"}
TOOL_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
PASSED_THROUGH = ("safetySettings", "cachedContent")  # generateContent fields with no OpenAI counterpart


def _part(part: Mapping[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"text": part["text"]}
    if kind == "image_url":
        image = part["image_url"]
        url = image["url"] if isinstance(image, dict) else image
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            return {"inlineData": {"mimeType": header[len("data:"):].split(";")[0], "data": data}}
        return {"fileData": {"fileUri": url}}
    raise UnsupportedRequest(f"content part type {kind!r} is not supported by gemini")


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"text": content}]
    return [_part(part) for part in content]


def to_contents(messages: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The ``systemInstruction`` and ``contents`` of an OpenAI message list."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool call id -> function name, for the responses
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_parts(message.get("content")))
            continue
        if role == "user":
            role, parts = "user", _parts(message.get("content"))
        elif role == "assistant":
            parts = _parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                call_names[call["id"]] = call["function"]["name"]
                parts.append({"functionCall": {"name": call["function"]["name"],
                                               "args": orjson.loads(call["function"].get("arguments") or "{}")}})
            role = "model"
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise UnsupportedRequest(f"tool message answers unknown call {message.get('tool_call_id')!r}")
            content = message.get("content")
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])
            role, parts = "user", [{"functionResponse": {"name": name, "response": {"content": text}}}]
        else:
            raise UnsupportedRequest(f"message role {role!r} is not supported by gemini")
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return ({"parts": system} if system else None), contents


def to_generate_content(body: Mapping[str, Any]) -> dict[str, Any]:
    system, contents = to_contents(body["messages"])
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = system
    config = {gemini: body[name] for name, gemini in GENERATION_FIELDS.items() if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format") or {}
    if response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    native_config = body.get("generationConfig")
    if isinstance(native_config, dict):
        config.update(native_config)
    if config:
        request["generationConfig"] = config
    if body.get("tools"):
        request["tools"] = [{"functionDeclarations": [
            {key: value for key, value in tool["function"].items() if key in ("name", "description", "parameters")}
            for tool in body["tools"]]}]
        choice = body.get("tool_choice")
        if isinstance(choice, str) and choice in TOOL_MODES:
            request["toolConfig"] = {"functionCallingConfig": {"mode": TOOL_MODES[choice]}}
        elif isinstance(choice, dict) and choice.get("type") == "function":
            request["toolConfig"] = {"functionCallingConfig": {
                "mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}}
    request.update({name: body[name] for name in PASSED_THROUGH if name in body})
    return request


def to_chat_completion(answer: Mapping[str, Any], model: str, created: int) -> dict[str, Any]:
    choices = []
    for position, candidate in enumerate(answer.get("candidates") or []):
        parts = (candidate.get("content") or {}).get("parts") or []
        texts = [part["text"] for part in parts if "text" in part and not part.get("thought")]
        calls = [{"id": f"call_{position}_{number}", "type": "function",
                  "function": {"name": part["functionCall"]["name"],
                               "arguments": orjson.dumps(part["functionCall"].get("args", {})).decode()}}
                 for number, part in enumerate(p for p in parts if "functionCall" in p)]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
        finish = FINISH_REASONS.get(candidate.get("finishReason"), "stop")
        if calls:
            message["tool_calls"], finish = calls, "tool_calls"
        choices.append({"index": candidate.get("index", position), "message": message,
                        "finish_reason": finish, "logprobs": None})
    usage = answer.get("usageMetadata") or {}
    prompt_tokens = usage.get("promptTokenCount", 0)
    completion_tokens = usage.get("candidatesTokenCount", 0)
    return {
        "id": answer.get("responseId") or f"gemini-{created}",
        "object": "chat.completion",
        "created": created,
        "model": answer.get("modelVersion") or model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": usage.get("totalTokenCount", prompt_tokens + completion_tokens)},
    }


def to_batch_embed(model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    inputs = body["input"]
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not all(isinstance(text, str) for text in texts):
        raise UnsupportedRequest("gemini embeddings take text inputs only, not token arrays")
    extra = {"outputDimensionality": body["dimensions"]} if body.get("dimensions") else {}
    if body.get("task_type"):
        extra["taskType"] = body["task_type"]
    return {"requests": [{"model": f"models/{model}", "content": {"parts": [{"text": text}]}, **extra}
                         for text in texts]}


def to_embedding_list(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": item["values"]}
                 for index, item in enumerate(answer.get("embeddings") or [])],
        "model": model,
    }


class GeminiAdapter:
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any], files: Sequence[UploadedFile] = ()) -> HttpRequest:
        if request_type is R.chat_completion:
            method, payload = "generateContent", to_generate_content(body)
        elif request_type is R.embedding:
            method, payload = "batchEmbedContents", to_batch_embed(model, body)
        else:
            raise UnsupportedRequest(f"gemini does not support {request_type.value} requests")
        headers = json_headers("x-goog-api-key", endpoint.api_key)
        url = f"{endpoint.base_url}/v1beta/models/{quote(model, safe='')}:{method}"
        return HttpRequest("POST", url, headers, json=payload)

    def parse_result(self, request_type: RequestType, response: HttpResponse, *, model: str,
                     body: Mapping[str, Any]) -> dict[str, Any]:
        answer = json_object(response)
        if request_type is R.embedding:
            return to_embedding_list(answer, model)
        return to_chat_completion(answer, model, created=int(time.time()))

    def parse_failure(self, response: HttpResponse) -> ProviderFailure:
        body = json_or_none(response.body)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(body, list) and body and isinstance(body[0], dict):
            error = body[0].get("error")  # some Google front ends wrap the error in a list
        if isinstance(error, dict) and error.get("message"):
            return ProviderFailure(status_code=response.status, message=str(error["message"]),
                                   type=error.get("status"), retry_after_seconds=retry_after_seconds(response.headers))
        return text_failure(response)
