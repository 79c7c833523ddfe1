"""Anthropic: OpenAI chat completions in, the Messages API out, and a chat completion back.

Request (``POST <base_url>/v1/messages``, headers ``x-api-key`` and ``anthropic-version``):

- ``system``/``developer`` messages join into the top-level ``system`` text;
- ``user``/``assistant`` turns become messages; text parts stay text, ``image_url`` parts become
  ``image`` blocks (a ``data:`` URL as base64, anything else by URL);
- an assistant's ``tool_calls`` become ``tool_use`` blocks, and ``tool`` messages become
  ``tool_result`` blocks in a user turn; consecutive turns of one role are merged, since the
  API wants them alternating;
- ``max_tokens`` (or ``max_completion_tokens``) is required there: ``DEFAULT_MAX_TOKENS`` when
  absent; ``stop`` becomes ``stop_sequences``; ``tools``, ``tool_choice`` and
  ``parallel_tool_calls`` become Anthropic's tools and ``tool_choice``; ``user`` becomes
  ``metadata.user_id``; ``temperature`` and ``top_p`` are kept;
- the Messages API's own fields that have no OpenAI counterpart pass through as given
  (``PASSED_THROUGH``: ``top_k``, ``thinking``, ``metadata``, ``service_tier``, ``container``,
  ``mcp_servers``);
- every other field is dropped: OpenAI's that have no equivalent (``n``, ``logprobs``,
  penalties, ``seed``, ``response_format``...) and unknown ones, which the API would refuse
  with 400 (and which may be meant for another target of the job).

Response: text blocks join into the message content, ``tool_use`` blocks become ``tool_calls``,
the stop reason maps to a ``finish_reason``, usage to OpenAI's token counts. Errors are
``{"type": "error", "error": {"type", "message"}}``; 529 (overloaded) is retryable like any 5xx.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

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

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
PASSED_THROUGH = ("top_k", "thinking", "metadata", "service_tier", "container", "mcp_servers")
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter"}


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[len("data:"):].split(";")[0]
        if ";base64" not in header or not media_type:
            raise UnsupportedRequest("image data URLs must be base64 with a media type")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part["image_url"]
            blocks.append(_image_block(image["url"] if isinstance(image, dict) else image))
        else:
            raise UnsupportedRequest(f"content part type {kind!r} is not supported by anthropic")
    return blocks


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def _tool_use_block(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    try:
        tool_input = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise UnsupportedRequest(f"tool call {call.get('id')} has arguments that are not JSON") from None
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": tool_input}


def _tool_result_block(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    return {"type": "tool_result", "tool_use_id": message["tool_call_id"],
            "content": content if isinstance(content, str) else _content_blocks(content)}


def to_messages(openai_messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The system text and the alternating user/assistant turns of an OpenAI message list."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in openai_messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
            continue
        if role == "tool":
            role, blocks = "user", [_tool_result_block(message)]
        elif role == "assistant":
            blocks = _content_blocks(message.get("content"))
            blocks += [_tool_use_block(call) for call in message.get("tool_calls") or []]
        elif role == "user":
            blocks = _content_blocks(message.get("content"))
        else:
            raise UnsupportedRequest(f"message role {role!r} is not supported by anthropic")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return ("\n\n".join(system) if system else None), turns


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    translated: dict[str, Any] | None
    if choice is None:
        translated = {"type": "auto"} if parallel is False else None
    elif choice in ("auto", "none"):
        translated = {"type": choice}
    elif choice == "required":
        translated = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        translated = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise UnsupportedRequest(f"tool_choice {choice!r} is not supported by anthropic")
    if translated is not None and parallel is False and translated["type"] != "none":
        translated["disable_parallel_tool_use"] = True
    return translated


def to_messages_request(model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    system, messages = to_messages(body["messages"])
    request: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = system
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        request["tools"] = [{
            "name": tool["function"]["name"],
            **({"description": tool["function"]["description"]} if tool["function"].get("description") else {}),
            "input_schema": tool["function"].get("parameters") or {"type": "object", "properties": {}},
        } for tool in body["tools"]]
        tool_choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if tool_choice is not None:
            request["tool_choice"] = tool_choice
    if body.get("user") and "metadata" not in body:
        request["metadata"] = {"user_id": body["user"]}
    request.update({name: body[name] for name in PASSED_THROUGH if name in body})
    return request


def to_chat_completion(message: Mapping[str, Any], created: int) -> dict[str, Any]:
    """A Messages API response as an OpenAI chat completion."""
    texts = [block["text"] for block in message.get("content", []) if block.get("type") == "text"]
    tool_calls = [{
        "id": block["id"], "type": "function",
        "function": {"name": block["name"], "arguments": orjson.dumps(block.get("input", {})).decode()},
    } for block in message.get("content", []) if block.get("type") == "tool_use"]
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    usage = message.get("usage") or {}
    prompt_tokens = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) \
        + (usage.get("cache_read_input_tokens") or 0)
    completion_tokens = usage.get("output_tokens") or 0
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [{
            "index": 0,
            "message": reply,
            "finish_reason": FINISH_REASONS.get(str(message.get("stop_reason")), "stop"),
            "logprobs": None,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.get("cache_read_input_tokens") or 0},
        },
    }


class AnthropicAdapter:
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any], files: Sequence[UploadedFile] = ()) -> HttpRequest:
        if request_type is not RequestType.chat_completion:
            raise UnsupportedRequest(f"anthropic does not support {request_type.value} requests")
        headers = json_headers("x-api-key", endpoint.api_key) | {"anthropic-version": API_VERSION}
        return HttpRequest("POST", f"{endpoint.base_url}/v1/messages", headers, json=to_messages_request(model, body))

    def parse_result(self, request_type: RequestType, response: HttpResponse, *, model: str,
                     body: Mapping[str, Any]) -> dict[str, Any]:
        return to_chat_completion(json_object(response), created=int(time.time()))

    def parse_failure(self, response: HttpResponse) -> ProviderFailure:
        body = json_or_none(response.body)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return ProviderFailure(status_code=response.status, message=str(error["message"]),
                                   type=error.get("type"), retry_after_seconds=retry_after_seconds(response.headers))
        return text_failure(response)
