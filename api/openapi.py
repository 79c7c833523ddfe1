"""The API's OpenAPI 3.1 document, served at ``GET /openapi.json``, built from the code that validates.

The JSON bodies are the pydantic models of ``api.request_models`` (``REQUEST_MODELS``) as
components, each submit's body adding what ``JSON_RULES`` requires (``allOf``: the required fields
non-empty, the streaming value refused); the multipart forms come from ``FORM_RULES``; ``model``
and ``fallbacks`` are held to the providers configured for the request type and to
``max_fallbacks``; the error object is ``app.jobs.ErrorObject``; the paths are ``api.routes.PATHS``.
What the validation does by hand (splitting and resolving ``provider/model``, a form's stripped
fields and comma-separated fallbacks) is said here as patterns built from that same data, and
tests/api/test_openapi.py holds each against the validation itself. The shapes the handlers
write as dicts (the job object, the submit's 202, the health pages) are typed here, as closed
TypedDicts, and the tests check them against what the code renders.

The document says exactly what is accepted, so that a client (or a fuzzer) that follows it gets
its submit queued, and one that does not gets a 4xx. Each submit's 202 links to the poll of the
same request type, carrying the job id and the service key.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal, NotRequired
from uuid import UUID

from aiohttp import web
from pydantic import ConfigDict, TypeAdapter, with_config
from typing_extensions import TypedDict

from api.errors import JOB_ID_HEADER
from api.request_models import REQUEST_MODELS
from api.routes import PATHS, SETTINGS
from api.validation import FORM_RULES, JSON_RULES, TTL_HEADER
from app.jobs import ErrorObject, JobStatus, RequestType, RetryInfo
from app.settings import Settings

OPENAPI_PATH = "/openapi.json"
COMPONENTS = "#/components/schemas/"
WEBHOOK_HEADER = "x-bf-async-webhook"
# Service keys read from plain headers; an sk-bf- key in Authorization is the bearer scheme below.
KEY_HEADERS = ("x-bf-vk", "x-api-key", "x-goog-api-key")

# What _is_empty in api.validation counts as a missing field.
EMPTY_VALUES: list[Any] = [None, "", [], {}]

# The JSON integers a body can hold: orjson reads a larger one as a float, which an integer field
# refuses (and an extra field carries as a float).
JSON_INTEGER_RANGE = {"minimum": -(2**63), "maximum": 2**64 - 1}

# A form part's name is a header parameter: a control character (but tab) makes the part
# unreadable, and so do two semicolons in it (aiohttp 3.14's Content-Disposition parser).
PART_NAME = {"pattern": r"^[^\x00-\x08\x0a-\x1f\x7f;]*$"}

# -- the shapes the handlers write as dicts ------------------------------------------------------

Closed = with_config(ConfigDict(extra="forbid"))


@Closed
class SubmitAccepted(TypedDict):
    """A submit's 202: the job is in Kafka."""

    id: UUID
    status: Literal[JobStatus.pending]
    created_at: datetime


@Closed
class RunningJob(TypedDict):
    """A poll's 202: the job is waiting or running; ``retry`` while a failed call waits to be retried."""

    id: UUID
    status: Literal[JobStatus.pending, JobStatus.processing]
    created_at: datetime
    retry: NotRequired[RetryInfo]


@Closed
class CompletedJob(TypedDict):
    """A poll's 200 for a job that succeeded: ``result`` is the provider's answer in OpenAI format."""

    id: UUID
    status: Literal[JobStatus.completed]
    created_at: datetime
    completed_at: datetime
    expires_at: datetime
    status_code: int
    result: dict[str, Any]


@Closed
class FailedJob(TypedDict):
    """A poll's 200 for a job that failed: ``error`` is the provider's (or Ferry's) error object."""

    id: UUID
    status: Literal[JobStatus.failed]
    created_at: datetime
    completed_at: datetime
    expires_at: datetime
    status_code: int
    error: ErrorObject


@Closed
class Liveness(TypedDict):
    status: Literal["ok"]


@Closed
class Readiness(TypedDict):
    """Whether a submit can be published now and the view of the jobs table has caught up."""

    status: Literal["ok", "unavailable"]
    kafka: bool
    table_caught_up: bool


RESPONSE_SHAPES: dict[str, Any] = {
    "ErrorObject": ErrorObject, "SubmitAccepted": SubmitAccepted, "RunningJob": RunningJob,
    "CompletedJob": CompletedJob, "FailedJob": FailedJob, "Liveness": Liveness, "Readiness": Readiness,
}

# -- building blocks -----------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": COMPONENTS + name}


def type_schema(shape: Any, mode: Literal["validation", "serialization"]) -> dict[str, Any]:
    """``shape``'s JSON schema with its references pointing into the document's components."""
    return TypeAdapter(shape).json_schema(mode=mode, ref_template=COMPONENTS + "{model}")


def bound_integers(schema: Any) -> Any:
    """``schema`` with every integer held to what the JSON parser reads as an integer."""
    if isinstance(schema, list):
        return [bound_integers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bound_integers(value) for key, value in schema.items()}
    if schema.get("type") == "integer":
        bounded = JSON_INTEGER_RANGE | bounded
    return bounded


def request_schema(model: type) -> dict[str, Any]:
    """A request model's schema as the document has it: integers bounded as the parser reads them."""
    schema: dict[str, Any] = bound_integers(type_schema(model, "validation"))
    return schema


def _add_component(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    schema = dict(schema)
    for def_name, definition in schema.pop("$defs", {}).items():
        _add_component(schemas, def_name, definition)
    if schemas.setdefault(name, schema) != schema:
        raise ValueError(f"two different schemas are named {name}")


def _one_of_names(names: list[str]) -> str:
    return "(?:" + "|".join(re.escape(name) for name in sorted(names)) + ")"


def target_pattern(providers: list[str]) -> str:
    """A JSON ``provider/model`` that resolves: a configured provider, a slash, a non-empty model
    (the name is split as sent, on its first slash)."""
    return rf"^{_one_of_names(providers)}/[\s\S]"


# What str.strip() removes from a form field, spelled out: regex engines disagree on \s (ECMA's
# leaves out \x1c-\x1f, which Python strips).
_SPACES = "".join(f"\\u{code:04x}" for code in range(0x10000) if chr(code).isspace())
SPACE = f"[{_SPACES}]"
NOT_SPACE = f"[^{_SPACES}]"


def form_target_pattern(providers: list[str]) -> str:
    """A form's ``model``: as in JSON, but the field is stripped of surrounding whitespace first."""
    return rf"^{SPACE}*{_one_of_names(providers)}/{SPACE}*{NOT_SPACE}"


def form_fallbacks_pattern(providers: list[str], max_fallbacks: int) -> str:
    """A form's ``fallbacks`` field: comma-separated names, each stripped, empty ones skipped;
    at most ``max_fallbacks`` pieces, so never more names."""
    name = rf"{SPACE}*{_one_of_names(providers)}/[^,]*[^,{_SPACES}][^,]*"
    piece = rf"(?:{name}|{SPACE}*)"
    return rf"^{piece}(?:,{piece}){{0,{max_fallbacks - 1}}}$"


# A form's stream field is refused when it is "true" (stripped, any case). A pattern rather than a
# "not": schemathesis's coverage phase cannot generate around a "not" in a schema with file parts.
FORM_STREAM_PATTERN = rf"^(?!{SPACE}*[Tt][Rr][Uu][Ee]{SPACE}*$)"


# For a request type no configured provider serves; no "not" (see FORM_STREAM_PATTERN).
UNSATISFIABLE: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 0,
                                 "description": "No configured provider serves this request type."}


def _providers_for(settings: Settings, request_type: RequestType) -> list[str]:
    return [name for name, endpoint in settings.provider_endpoints.items() if request_type in endpoint.request_types]


def json_rules_schema(request_type: RequestType, settings: Settings) -> dict[str, Any]:
    """What ``validate_json_submit`` asks beyond the model's types, as JSON schema."""
    rules = JSON_RULES[request_type]
    providers = _providers_for(settings, request_type)
    target = {"type": "string", "pattern": target_pattern(providers)} if providers else UNSATISFIABLE
    properties: dict[str, Any] = {
        "model": target,
        # Keywords that apply to arrays only: null stays allowed, as the model says.
        "fallbacks": {"maxItems": settings.max_fallbacks, "items": target},
    }
    for field, message in rules.required:
        properties[field] = {"not": {"enum": EMPTY_VALUES}, "description": f"Missing or empty: 400 {message!r}."}
    if rules.stream_field:
        refused = json.dumps(rules.stream_value)
        properties[rules.stream_field] = {"not": {"const": rules.stream_value},
                                          "description": f"{refused}: 400 {rules.stream_message!r}."}
    required = ["model", *(field for field, _ in rules.required)]
    return {"type": "object", "required": required, "properties": properties}


def form_schema(request_type: RequestType, settings: Settings) -> dict[str, Any]:
    """The multipart form ``validate_form_submit`` takes: file parts, ``model``, ``fallbacks``,
    and any other field as text (forwarded to the provider when non-empty)."""
    rules = FORM_RULES[request_type]
    providers = _providers_for(settings, request_type)
    file_part = {"type": "string", "format": "binary"}
    properties: dict[str, Any] = {
        "model": ({"type": "string", "pattern": form_target_pattern(providers),
                   "description": "provider/model, split on the first slash."} if providers else UNSATISFIABLE),
        # Documented as one field: the server also takes repeated fields, and counts the names of all
        # of them against max_fallbacks, which a schema of an array cannot say.
        "fallbacks": {
            "type": "string",
            "pattern": (form_fallbacks_pattern(providers, settings.max_fallbacks) if providers
                        else rf"^[,{_SPACES}]*$"),
            "description": (f"Comma-separated provider/model names, at most {settings.max_fallbacks}; "
                            "the field may also be repeated."),
        },
    }
    for field in sorted(rules.file_fields):
        # image[] is the repeated form of image (several images in one edit).
        properties[field] = ({"type": "array", "items": file_part} if field.endswith("[]") else file_part)
    if rules.stream_message:
        properties["stream"] = {"type": "string", "pattern": FORM_STREAM_PATTERN,
                                "description": f"true: 400 {rules.stream_message!r}."}
    wanted, message = rules.required_file
    schema: dict[str, Any] = {
        "type": "object", "properties": properties, "required": ["model"],
        # Other fields are forwarded when non-empty; a repeated one as the list of its values.
        "propertyNames": PART_NAME,
        "additionalProperties": {"type": ["string", "array"], "items": {"type": "string"}},
        "description": f"Without a non-empty {' or '.join(sorted(wanted))} part: 400 {message!r}.",
    }
    if len(wanted) == 1:
        field = next(iter(wanted))
        schema["required"].append(field)
        properties[field] = properties[field] | {"minLength": 1}
    else:
        # At least one non-empty file among the wanted fields (an empty mask does not matter).
        schema["anyOf"] = [{"required": [field], "properties": {field: {"contains": {"minLength": 1}}
                                                                if field.endswith("[]") else {"minLength": 1}}}
                           for field in sorted(wanted)]
    return schema


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref("ErrorObject"))}
    if headers:
        response["headers"] = headers
    return response


SECONDS_HEADER = {"description": "Seconds to wait before retrying.", "required": True,
                  "schema": {"type": "string", "pattern": r"^[0-9]+$"}}
UNAVAILABLE = "Kafka is unavailable: retry after Retry-After seconds."


def _key_parameters() -> list[dict[str, Any]]:
    return [{
        "name": name, "in": "header", "required": False,
        "description": ("A service key: the job belongs to it, and only it can poll the job."
                        if name == "x-bf-vk" else
                        "Read as a service key only when it starts with sk-bf- (any case)."),
        "schema": {"type": "string"},
    } for name in KEY_HEADERS]


def _submit_operation(request_type: RequestType, settings: Settings) -> dict[str, Any]:
    name = request_type.value
    if request_type in FORM_RULES:
        body = {"multipart/form-data": {"schema": _ref(f"{name}_form")}}
        limit = settings.max_upload_bytes
    else:
        model = _ref(REQUEST_MODELS[request_type].__name__)
        body = _json({"allOf": [model, json_rules_schema(request_type, settings)]})
        limit = settings.max_request_bytes
    # The job and the key it belongs to (x-api-key and x-goog-api-key are read only with an
    # sk-bf- prefix: x-bf-vk is the key header a client sets).
    link_parameters = {"job_id": "$response.body#/id", "x-bf-vk": "$request.header.x-bf-vk"}
    return {
        "operationId": f"submit_{name}",
        "summary": f"Submit a {name} job.",
        "tags": [name],
        "security": [{}, {"serviceKeyBearer": []}],
        "parameters": [
            *_key_parameters(),
            {"name": TTL_HEADER, "in": "header", "required": False,
             "description": ("Seconds the result is kept after completion. Absent, empty, not an integer or "
                             "negative: the server default; 0: 3600; capped at the server maximum."),
             "schema": {"type": "string"}},
            {"name": WEBHOOK_HEADER, "in": "header", "required": False,
             "description": "Webhooks are not configured: any endpoint name is refused with 400.",
             "schema": {"type": "string", "maxLength": 0}},
        ],
        "requestBody": {"required": True, "content": body},
        "responses": {
            "202": {
                "description": "Accepted: the job is in Kafka.",
                "content": _json(_ref("SubmitAccepted")),
                "links": {"poll": {"operationId": f"poll_{name}", "parameters": link_parameters,
                                   "description": "The job's state, polled with the key it was submitted with."}},
            },
            "400": _error("Invalid request: nothing was queued."),
            "408": _error("The body did not arrive in time."),
            "413": _error(f"Body over the limit ({limit} bytes)."),
            "503": _error(UNAVAILABLE + f" With {JOB_ID_HEADER}, the job may have been queued: poll it first.",
                          {"Retry-After": SECONDS_HEADER,
                           JOB_ID_HEADER: {"description": "The job Kafka did not confirm in time.",
                                           "schema": {"type": "string", "format": "uuid"}}}),
        },
    }


def _poll_operation(request_type: RequestType) -> dict[str, Any]:
    name = request_type.value
    return {
        "operationId": f"poll_{name}",
        "summary": f"Poll a {name} job.",
        "tags": [name],
        "security": [{}, {"serviceKeyBearer": []}],
        "parameters": [
            {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}},
            *_key_parameters(),
        ],
        "responses": {
            "200": {"description": "The job ended: completed or failed.",
                    "content": _json({"oneOf": [_ref("CompletedJob"), _ref("FailedJob")]})},
            "202": {"description": "The job is pending or processing.", "content": _json(_ref("RunningJob"))},
            "400": _error("The service key is not valid UTF-8."),
            "404": _error("Unknown or expired job, another request type's job, or not the caller's job."),
            "503": _error(UNAVAILABLE, {"Retry-After": SECONDS_HEADER}),
        },
    }


def _service_operations() -> dict[str, Any]:
    live = {"description": "The process is up.", "content": _json(_ref("Liveness"))}
    return {
        "/health": {"get": {"operationId": "health", "summary": "Liveness.", "tags": ["health"],
                            "responses": {"200": live}}},
        "/health/live": {"get": {"operationId": "health_live", "summary": "Liveness.", "tags": ["health"],
                                 "responses": {"200": live}}},
        "/health/ready": {"get": {
            "operationId": "health_ready", "summary": "Readiness, asked of Kafka.", "tags": ["health"],
            "responses": {
                "200": {"description": "Ready.", "content": _json(_ref("Readiness"))},
                "503": {"description": "Not ready.", "content": _json(_ref("Readiness"))},
            },
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Counters and timings, in Prometheus' text format.",
            "tags": ["health"],
            "responses": {"200": {"description": "Prometheus' exposition format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        OPENAPI_PATH: {"get": {
            "operationId": "openapi", "summary": "This document.", "tags": ["meta"],
            "responses": {"200": {"description": "The OpenAPI 3.1 document.",
                                  "content": _json({"type": "object"})}},
        }},
    }


def build_document(settings: Settings) -> dict[str, Any]:
    """The whole API for ``settings`` (the configured providers constrain ``model``)."""
    schemas: dict[str, Any] = {}
    for model in REQUEST_MODELS.values():
        _add_component(schemas, model.__name__, request_schema(model))
    for name, shape in RESPONSE_SHAPES.items():
        _add_component(schemas, name, type_schema(shape, "serialization"))
    for request_type in FORM_RULES:
        _add_component(schemas, f"{request_type.value}_form", form_schema(request_type, settings))
    paths: dict[str, Any] = {}
    for request_type, path in PATHS.items():
        paths[f"/v1/async/{path}"] = {"post": _submit_operation(request_type, settings)}
        paths[f"/v1/async/{path}/{{job_id}}"] = {"get": _poll_operation(request_type)}
    paths.update(_service_operations())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Ferry",
            "version": "0.1.0",
            "description": ("LLM requests as durable asynchronous jobs on Kafka, speaking the Bifrost async jobs API. "
                            "Every answer that is not 2xx (but /health/ready's 503) is the error object."),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"serviceKeyBearer": {
                "type": "http", "scheme": "bearer",
                "description": "Authorization: Bearer sk-bf-...: a service key; other bearer tokens are not read.",
            }},
        },
    }


def add_openapi_route(api: web.Application) -> None:
    """Serve the document built for the app's settings; built once, at startup."""
    body = json.dumps(build_document(api[SETTINGS])).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    api.router.add_get(OPENAPI_PATH, openapi)
