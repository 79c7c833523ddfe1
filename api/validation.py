"""Submit validation: a request body in, the job's targets and forwarded body out, or a 400.

The rules per request type are data: the body's field types are the pydantic models of
``api.request_models`` (``REQUEST_MODELS``), ``JSON_RULES`` says which fields are required, with
the contract's message for each, and which value means streaming; ``FORM_RULES`` does the same
for multipart forms. Checks run in the contract's order: a parsable body whose known fields have
their JSON types, model, the type's required fields, streaming, then the fallbacks and providers.
Multipart forms are read part by part (``read_form``); their files travel with the job as
``UploadedFile`` records.

Whatever passes must also be storable: the job record is JSON in Kafka, written and read back
by pydantic, so a body nested deeper than the record's parser takes, or a form string that is
not valid UTF-8, is refused here rather than failing after the submit (or never being read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError

from api.errors import ApiError, bad_request, too_large
from api.request_models import REQUEST_MODELS, RequestBody
from app.jobs import RequestType, Target, UploadedFile
from app.providers import CATALOGUE, RESERVED_NAMES, ProviderEndpoint
from app.settings import Settings

TTL_HEADER = "x-bf-async-job-result-ttl"

DEFAULT_MAX_FALLBACKS: int = Settings.model_fields["max_fallbacks"].default

# The worker reads a job record back with pydantic's JSON parser, which stops at 200 levels of
# nesting (pydantic-core's limit; its serializer stops at 256 and orjson's at 255), and the body
# sits one level inside the record. Bodies nested deeper are refused at submit: accepted, they
# would be queued and never read.
RECORD_PARSE_DEPTH = 200
MAX_BODY_DEPTH = RECORD_PARSE_DEPTH - 1

# Parts (or urlencoded fields) of one form. OpenAI's forms have a dozen fields and up to 16
# images; fallbacks given as repeated fields are capped by max_fallbacks. Without a bound, 26 MiB
# of empty parts is hundreds of thousands of parts to parse and carry.
MAX_FORM_PARTS = 1000

# Longest client-given name quoted back in an error message.
QUOTED_NAME_CHARS = 100


@dataclass(frozen=True)
class JsonRules:
    required: tuple[tuple[str, str], ...]  # (field, message when missing or empty)
    stream_field: str | None = None
    stream_value: Any = True
    stream_message: str = ""  # the refusal when stream_field holds stream_value


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

# The rules name only fields the models type, so a required field always has its JSON type checked.
assert REQUEST_MODELS.keys() == JSON_RULES.keys()
assert all(field in REQUEST_MODELS[request_type].model_fields
           for request_type, rules in JSON_RULES.items()
           for field in [name for name, _ in rules.required] + [rules.stream_field] if field)


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


@dataclass(frozen=True)
class Submission:
    targets: list[Target]
    body: dict[str, Any]
    files: tuple[UploadedFile, ...] = ()


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _quoted(name: str) -> str:
    """``name`` for an error message: a megabyte-long model name is not echoed whole."""
    return name if len(name) <= QUOTED_NAME_CHARS else name[:QUOTED_NAME_CHARS] + "..."


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests more than ``limit`` levels (a bare object or array is one).

    Level by level rather than recursively: Python's own recursion limit is below orjson's 1,024.
    """
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if type(child) is dict or type(child) is list]
        if not level:
            return False
    return bool(level)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; orjson refuses invalid UTF-8, lone surrogates, NaN and a BOM."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid request format: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("invalid request format: the body must be a JSON object")
    if nested_deeper_than(body, MAX_BODY_DEPTH):
        raise bad_request(f"invalid request format: nested deeper than {MAX_BODY_DEPTH} levels")
    return body


# pydantic's words for a JSON object name its Python types; the client sent JSON.
_OBJECT_ERRORS = {"model_type", "dict_type", "model_attributes_type"}


def check_types(body: dict[str, Any], request_type: RequestType) -> RequestBody:
    """The body's known fields checked against the request type's model: 400 on a wrong JSON type."""
    try:
        return REQUEST_MODELS[request_type].model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        message = "Input should be a valid object" if first["type"] in _OBJECT_ERRORS else first["msg"]
        raise bad_request(f"invalid request format: {where}: {message}") from None


def check_fallback_count(count: int, max_fallbacks: int) -> None:
    if count > max_fallbacks:
        raise bad_request(f"at most {max_fallbacks} fallbacks are allowed, got {count}")


def resolve_target(name: str, request_type: RequestType, endpoints: dict[str, ProviderEndpoint]) -> Target:
    """A ``provider/model`` name checked against the configured providers."""
    target = Target.parse(name)
    if not target.provider or not target.model:
        raise bad_request(f"model must be in the form provider/model, got {_quoted(name)!r}")
    endpoint = endpoints.get(target.provider)
    if endpoint is None:
        if target.provider in CATALOGUE or target.provider in RESERVED_NAMES:
            raise bad_request(f"provider {target.provider} is not configured")
        raise bad_request(f"unknown provider: {_quoted(target.provider)}")
    if request_type not in endpoint.request_types:
        raise bad_request(f"provider {target.provider} does not support {request_type.value} requests")
    return target


def validate_json_submit(raw: bytes, request_type: RequestType, endpoints: dict[str, ProviderEndpoint],
                         max_fallbacks: int = DEFAULT_MAX_FALLBACKS) -> Submission:
    body = parse_json_object(raw)
    typed = check_types(body, request_type)
    if typed.model is None or _is_empty(typed.model):
        raise bad_request("model is required")
    rules = JSON_RULES[request_type]
    for field, message in rules.required:
        if _is_empty(body.get(field)):
            raise bad_request(message)
    if rules.stream_field and body.get(rules.stream_field) == rules.stream_value:
        raise bad_request(rules.stream_message)
    fallbacks = typed.fallbacks or []
    check_fallback_count(len(fallbacks), max_fallbacks)
    targets = [resolve_target(name, request_type, endpoints) for name in [typed.model, *fallbacks]]
    forwarded = {key: value for key, value in body.items() if key not in ("model", "fallbacks")}
    return Submission(targets=targets, body=forwarded)


@dataclass(frozen=True)
class Form:
    fields: dict[str, str | list[str]]  # a repeated field (timestamp_granularities[]) is a list
    files: tuple[UploadedFile, ...]


class _FormError(ValueError):
    """A form Ferry cannot take: answered 400 ``failed to parse multipart form: <why>``."""


def _utf8(text: str, what: str) -> str:
    """``text`` if it can be stored: aiohttp keeps bytes that are not UTF-8 in header values as
    lone surrogates, and a decoded field can hold one, and the JSON record can hold neither."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _FormError(f"{what} is not valid UTF-8") from None
    return text


def _add_field(fields: dict[str, str | list[str]], name: str, value: str) -> None:
    previous = fields.get(name)
    if previous is None:
        fields[name] = value
    elif isinstance(previous, list):
        previous.append(value)
    else:
        fields[name] = [previous, value]


async def _read_urlencoded(request: web.BaseRequest) -> dict[str, str | list[str]]:
    # aiohttp's request.post() answers 500 for an unknown charset or bytes that are not in it.
    charset = request.charset or "utf-8"
    raw = await request.read()
    try:
        text = raw.decode(charset)
        pairs = parse_qsl(text, keep_blank_values=True, encoding=charset, errors="strict",
                          max_num_fields=MAX_FORM_PARTS)
    except LookupError:
        raise _FormError(f"unknown charset {_quoted(charset)!r}") from None
    except UnicodeDecodeError as exc:
        raise _FormError(f"the form is not valid {exc.encoding}") from None
    except ValueError:  # parse_qsl: more fields than max_num_fields
        raise _FormError(f"more than {MAX_FORM_PARTS} fields") from None
    fields: dict[str, str | list[str]] = {}
    for name, value in pairs:
        _add_field(fields, _utf8(name, "a field name"), _utf8(value, f"field {name}"))
    return fields


async def read_form(request: web.BaseRequest, request_type: RequestType, max_bytes: int) -> Form:
    """The multipart form of ``request``, its files kept whole; 400 if it is not a valid form."""
    rules = FORM_RULES[request_type]
    fields: dict[str, str | list[str]] = {}
    files: list[UploadedFile] = []
    total = 0
    parts = 0
    try:
        if request.content_type == "application/x-www-form-urlencoded":
            # A form without files (clients send one when the file is missing): read it as fields.
            return Form(fields=await _read_urlencoded(request), files=())
        if parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary") == "":
            raise _FormError("the boundary is empty")  # RFC 2046: 1 to 70 characters; aiohttp takes ""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > MAX_FORM_PARTS:
                raise _FormError(f"more than {MAX_FORM_PARTS} parts")
            if not isinstance(part, BodyPartReader):  # a nested multipart part comes as a reader of its own
                raise _FormError("a part is itself a multipart body")
            if part.name is None:
                raise _FormError("a part has no name")
            name = _utf8(part.name, "a part's name")
            data = await part.read()
            total += len(data)
            if total > max_bytes:
                raise too_large(max_bytes)
            if name in rules.file_fields or part.filename is not None:
                if name not in rules.file_fields:
                    raise _FormError(f"unexpected file field {name!r}")
                files.append(UploadedFile(
                    field=name, filename=_utf8(part.filename or name, f"the filename of part {name}"),
                    content_type=_utf8(part.headers.get("Content-Type", "application/octet-stream"),
                                       f"the content type of part {name}"),
                    data=bytes(data),
                ))
            else:
                charset = part.get_charset(default="utf-8")
                try:
                    value = data.decode(charset)
                except UnicodeDecodeError:
                    raise _FormError(f"field {name} is not valid {charset}") from None
                _add_field(fields, name, _utf8(value, f"field {name}"))
    except ApiError:
        raise
    except HttpProcessingError:
        # A part's headers that aiohttp's header parser refuses (a control character in a
        # name); its text may quote the client's bytes, so the message is fixed.
        raise bad_request("failed to parse multipart form: malformed part header") from None
    except (ValueError, AssertionError, LookupError) as exc:
        # aiohttp's reader raises these for a missing boundary, a bad part or a bad charset;
        # _FormError and UnicodeDecodeError are ValueErrors.
        raise bad_request(f"failed to parse multipart form: {exc}") from None
    return Form(fields=fields, files=tuple(files))


def _single(form: Form, name: str) -> str:
    value = form.fields.get(name, "")
    if isinstance(value, list):
        raise bad_request(f"invalid request format: field {name} is given more than once")
    return value.strip()


def validate_form_submit(form: Form, request_type: RequestType, endpoints: dict[str, ProviderEndpoint],
                         max_fallbacks: int = DEFAULT_MAX_FALLBACKS) -> Submission:
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
    check_fallback_count(len(fallbacks), max_fallbacks)
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
