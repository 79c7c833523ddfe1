"""Submit validation: a request body in, the job's targets and forwarded body out, or a 400.

The rules per request type are data (``JSON_RULES`` for JSON bodies, ``FORM_RULES`` for
multipart forms): which fields are required, with the contract's message for each, and which
value means streaming. Checks run in the contract's order: a parsable body, model, the type's
required fields, streaming, then the providers. Multipart forms are read part by part
(``read_form``); their files travel with the job as ``UploadedFile`` records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from api.errors import ApiError, bad_request, too_large
from app.jobs import RequestType, Target, UploadedFile
from app.providers import CATALOGUE, RESERVED_NAMES, ProviderEndpoint

TTL_HEADER = "x-bf-async-job-result-ttl"


@dataclass(frozen=True)
class JsonRules:
    required: tuple[tuple[str, str], ...]  # (field, message when missing or empty)
    stream_field: str | None = None
    stream_value: Any = True
    stream_message: str | None = None


JSON_RULES: dict[RequestType, JsonRules] = {
    RequestType.text_completion: JsonRules(
        required=(("prompt", "prompt is required for text completion"),),
        stream_field="stream", stream_message="stream is not supported for async text completions",
    ),
    RequestType.chat_completion: JsonRules(
        required=(("messages", "messages is required for chat completion"),),
        stream_field="stream", stream_message="stream is not supported for async chat completions",
    ),
    RequestType.responses: JsonRules(
        required=(("input", "input is required for responses"),),
        stream_field="stream", stream_message="stream is not supported for async responses",
    ),
    RequestType.embedding: JsonRules(required=(("input", "input is required for embeddings"),)),
    RequestType.speech: JsonRules(
        required=(("input", "input is required for speech completion"),
                  ("voice", "voice is required for speech completion")),
        stream_field="stream_format", stream_value="sse", stream_message="stream is not supported for async speech",
    ),
    RequestType.image_generation: JsonRules(
        required=(("prompt", "prompt is required for image generation"),),
        stream_field="stream", stream_message="stream is not supported for async image generations",
    ),
    RequestType.rerank: JsonRules(
        required=(("query", "query is required for rerank"), ("documents", "documents is required for rerank")),
    ),
    RequestType.ocr: JsonRules(required=(("document", "document is required for ocr"),)),
}


@dataclass(frozen=True)
class FormRules:
    file_fields: frozenset[str]  # form fields whose parts are files
    required_file: tuple[frozenset[str], str]  # (any of these fields, message when none came)
    stream_message: str | None = None  # form field stream=true is refused with this


FORM_RULES: dict[RequestType, FormRules] = {
    RequestType.transcription: FormRules(
        file_fields=frozenset({"file"}), required_file=(frozenset({"file"}), "file is required"),
        stream_message="stream is not supported for async transcriptions",
    ),
    RequestType.image_edit: FormRules(
        file_fields=frozenset({"image", "image[]", "mask"}),
        required_file=(frozenset({"image", "image[]"}), "at least one image is required"),
        stream_message="stream is not supported for async image edits",
    ),
    RequestType.image_variation: FormRules(
        file_fields=frozenset({"image"}), required_file=(frozenset({"image"}), "image is required"),
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
    files: tuple[UploadedFile, ...] = ()


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


@dataclass(frozen=True)
class Form:
    fields: dict[str, str | list[str]]  # a repeated field (timestamp_granularities[]) is a list
    files: tuple[UploadedFile, ...]


async def read_form(request, request_type: RequestType, max_bytes: int) -> Form:
    """The multipart form of ``request``, its files kept whole; 400 if it is not a valid form."""
    rules = FORM_RULES[request_type]
    fields: dict[str, str | list[str]] = {}
    files: list[UploadedFile] = []
    total = 0
    if request.content_type == "application/x-www-form-urlencoded":
        # A form without files (clients send one when the file is missing): read it as fields.
        posted = await request.post()
        return Form(fields={key: posted.getall(key) if len(posted.getall(key)) > 1 else posted[key]
                            for key in posted.keys()}, files=())
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name is None:
                raise ValueError("a part has no name")
            data = await part.read()
            total += len(data)
            if total > max_bytes:
                raise too_large(max_bytes)
            if part.name in rules.file_fields or part.filename is not None:
                if part.name not in rules.file_fields:
                    raise ValueError(f"unexpected file field {part.name!r}")
                files.append(UploadedFile(
                    field=part.name, filename=part.filename or part.name,
                    content_type=part.headers.get("Content-Type", "application/octet-stream"), data=bytes(data),
                ))
            else:
                value = data.decode(part.get_charset(default="utf-8"))
                if part.name in fields:
                    previous = fields[part.name]
                    fields[part.name] = [*previous, value] if isinstance(previous, list) else [previous, value]
                else:
                    fields[part.name] = value
    except ApiError:
        raise
    except (ValueError, AssertionError, LookupError) as exc:
        # aiohttp's reader raises these for a missing boundary, a bad part or a bad charset
        raise bad_request(f"failed to parse multipart form: {exc}") from None
    return Form(fields=fields, files=tuple(files))


def _single(form: Form, name: str) -> str:
    value = form.fields.get(name, "")
    if isinstance(value, list):
        raise bad_request(f"invalid request format: field {name} is given more than once")
    return value.strip()


def validate_form_submit(form: Form, request_type: RequestType,
                         endpoints: dict[str, ProviderEndpoint]) -> Submission:
    rules = FORM_RULES[request_type]
    model = _single(form, "model")
    if not model:
        raise bad_request("model is required")
    wanted_fields, message = rules.required_file
    if not any(upload.field in wanted_fields and upload.data for upload in form.files):
        raise bad_request(message)
    if rules.stream_message and _single(form, "stream").lower() == "true":
        raise bad_request(rules.stream_message)
    # In a form, fallbacks are repeated "fallbacks" fields, or one comma-separated field.
    given = form.fields.get("fallbacks", [])
    fallbacks = [name.strip() for value in ([given] if isinstance(given, str) else given)
                 for name in value.split(",") if name.strip()]
    targets = [resolve_target(name, request_type, endpoints) for name in [model, *fallbacks]]
    # "Other non-empty fields are passed on": an empty field means "not given" in a form.
    forwarded = {key: value for key, value in form.fields.items()
                 if key not in ("model", "fallbacks") and value != ""}
    return Submission(targets=targets, body=forwarded, files=form.files)


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
