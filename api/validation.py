"""Submit validation: a request body in, the job's targets and forwarded body out, or a 400.

The rules per request type are data (``JSON_RULES``): which fields are required, with the
contract's message for each, and which value means streaming. Checks run in the contract's
order: parsable JSON, model, the type's required fields, streaming, then the providers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from api.errors import ApiError, bad_request
from app.jobs import RequestType, Target
from app.providers import CATALOGUE, RESERVED_NAMES, ProviderEndpoint

TTL_HEADER = "x-bf-async-job-result-ttl"


@dataclass(frozen=True)
class JsonRules:
    required: tuple[tuple[str, str], ...]  # (field, message when missing or empty)
    stream_field: str | None = None
    stream_value: Any = True
    stream_message: str | None = None


JSON_RULES: dict[RequestType, JsonRules] = {
    RequestType.chat_completion: JsonRules(
        required=(("messages", "messages is required for chat completion"),),
        stream_field="stream", stream_message="stream is not supported for async chat completions",
    ),
}


class _CommonFields(BaseModel):
    """Types of the fields Ferry itself reads; every other field passes through untouched."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    fallbacks: list[str] | None = None


@dataclass(frozen=True)
class Submission:
    targets: list[Target]
    body: dict[str, Any]


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid request format: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("invalid request format: the body must be a JSON object")
    return body


def resolve_target(name: str, request_type: RequestType, endpoints: dict[str, ProviderEndpoint]) -> Target:
    """A ``provider/model`` name checked against the configured providers."""
    target = Target.parse(name)
    if not target.provider or not target.model:
        raise bad_request(f"model must be in the form provider/model, got {name!r}")
    endpoint = endpoints.get(target.provider)
    if endpoint is None:
        if target.provider in CATALOGUE or target.provider in RESERVED_NAMES:
            raise bad_request(f"provider {target.provider} is not configured")
        raise bad_request(f"unknown provider: {target.provider}")
    if request_type not in endpoint.request_types:
        raise bad_request(f"provider {target.provider} does not support {request_type.value} requests")
    return target


def validate_json_submit(raw: bytes, request_type: RequestType,
                         endpoints: dict[str, ProviderEndpoint]) -> Submission:
    body = parse_json_object(raw)
    try:
        common = _CommonFields.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request(f"invalid request format: {where}: {first['msg']}") from None
    if _is_empty(common.model):
        raise bad_request("model is required")
    rules = JSON_RULES[request_type]
    for field, message in rules.required:
        if _is_empty(body.get(field)):
            raise bad_request(message)
    if rules.stream_field and body.get(rules.stream_field) == rules.stream_value:
        raise bad_request(rules.stream_message)
    names = [common.model, *(common.fallbacks or [])]
    targets = [resolve_target(name, request_type, endpoints) for name in names]
    forwarded = {key: value for key, value in body.items() if key not in ("model", "fallbacks")}
    return Submission(targets=targets, body=forwarded)


def result_ttl_seconds(header: str | None, default: int, maximum: int) -> int:
    """The contract's TTL rules: absent, empty, not an integer or negative: the default; 0: 3600."""
    if header is None:
        return min(default, maximum)
    try:
        ttl = int(header.strip())
    except ValueError:
        return min(default, maximum)
    if ttl < 0:
        ttl = default
    elif ttl == 0:
        ttl = 3600
    return min(ttl, maximum)


def check_no_webhook(name: str | None) -> None:
    """Webhooks are not configurable yet, so any endpoint name is unknown: refuse, don't ignore."""
    if name:
        raise ApiError(400, f"webhook endpoint {name!r} is not configured")
