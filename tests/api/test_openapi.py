"""The OpenAPI document: valid OpenAPI 3.1, every route in it, built from the code's own models and
rules, and saying exactly what the validation accepts. Without a broker."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from api.errors import ApiError, bad_request, not_found, too_large, unavailable
from api.openapi import (
    COMPONENTS,
    JSON_INTEGER_RANGE,
    OPENAPI_PATH,
    add_openapi_route,
    bound_integers,
    build_document,
    type_schema,
)
from api.request_models import REQUEST_MODELS, ChatCompletionRequest
from api.routes import PATHS, SETTINGS
from api.server import create_api
from api.validation import FORM_RULES, JSON_RULES, Form, validate_form_submit, validate_json_submit
from app.jobs import (
    ErrorDetail,
    ErrorObject,
    JobRequest,
    JobState,
    Outcome,
    RequestLocation,
    RequestType,
    RetryInfo,
    Target,
    UploadedFile,
    rfc3339,
    utcnow,
)
from app.settings import Settings

R = RequestType
SETTINGS_WITH_PROVIDERS = Settings(providers={"openai": {"api_key": "sk-x"}, "cohere": {"api_key": "co-x"},
                                              "mistral": {"api_key": "mi-x"}})
DOCUMENT = build_document(SETTINGS_WITH_PROVIDERS)
ENDPOINTS = SETTINGS_WITH_PROVIDERS.provider_endpoints


def schemas_of(value):
    """Every JSON schema in the document: components, parameters, bodies and responses."""
    if isinstance(value, dict):
        if "schema" in value and isinstance(value["schema"], dict):
            yield value["schema"]
        for key, item in value.items():
            if key == "schemas":
                yield from item.values()
            else:
                yield from schemas_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from schemas_of(item)


def validator_for(schema: dict) -> jsonschema_rs.Validator:
    """A validator for ``schema`` with the document's components to refer to."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": DOCUMENT["components"]},
                                              validate_formats=True)


def response_schema(path: str, method: str, status: str) -> dict:
    return DOCUMENT["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]


# -- a valid document ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [Settings(), SETTINGS_WITH_PROVIDERS], ids=["no providers", "providers"])
def test_the_document_is_valid_openapi_3_1(settings: Settings) -> None:
    document = build_document(settings)
    assert document["openapi"] == "3.1.0"
    OPENAPI_31_VALIDATOR.validate(document)
    for schema in schemas_of(document):
        jsonschema_rs.meta.validate(schema)  # JSON Schema 2020-12, OpenAPI 3.1's dialect
    # schemathesis reads every operation of it (references resolve, patterns compile).
    loaded = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == sum(len(item) for item in document["paths"].values())


def test_every_route_the_app_serves_is_in_the_document() -> None:
    app = create_api(SETTINGS_WITH_PROVIDERS)
    served = {(route.method, route.resource.canonical) for route in app.router.routes()}
    documented = {(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item}
    # aiohttp answers HEAD wherever it answers GET: HTTP's HEAD is GET without the body.
    assert {(method, path) for method, path in served if method != "HEAD"} == documented
    assert {path for method, path in served if method == "HEAD"} == {path for method, path in documented
                                                                      if method == "GET"}


async def test_the_document_is_served() -> None:
    app = web.Application()
    app[SETTINGS] = SETTINGS_WITH_PROVIDERS
    add_openapi_route(app)
    async with TestClient(TestServer(app)) as client:
        response = await client.get(OPENAPI_PATH)
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == DOCUMENT


def test_each_submit_links_to_the_poll_of_its_request_type() -> None:
    for request_type, path in PATHS.items():
        links = DOCUMENT["paths"][f"/v1/async/{path}"]["post"]["responses"]["202"]["links"]
        assert links["poll"]["operationId"] == f"poll_{request_type.value}"
        assert DOCUMENT["paths"][f"/v1/async/{path}/{{job_id}}"]["get"]["operationId"] == f"poll_{request_type.value}"
        assert links["poll"]["parameters"]["job_id"] == "$response.body#/id"


# -- built from the code -------------------------------------------------------------------------------


def test_the_chat_body_is_the_chat_model() -> None:
    schema = ChatCompletionRequest.model_json_schema(ref_template=COMPONENTS + "{model}")
    definitions = schema.pop("$defs")
    components = DOCUMENT["components"]["schemas"]
    assert components["ChatCompletionRequest"] == schema
    assert {name: components[name] for name in definitions} == definitions
    body = DOCUMENT["paths"]["/v1/async/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["allOf"][0] == {"$ref": COMPONENTS + "ChatCompletionRequest"}


@pytest.mark.parametrize("request_type", list(REQUEST_MODELS))
def test_every_json_body_is_its_model_with_the_rules(request_type: RequestType) -> None:
    model = REQUEST_MODELS[request_type]
    schema = type_schema(model, "validation")
    schema.pop("$defs", None)
    # The model's schema, with integers held to what the JSON parser reads as integers.
    assert DOCUMENT["components"]["schemas"][model.__name__] == bound_integers(schema)
    body = DOCUMENT["paths"][f"/v1/async/{PATHS[request_type]}"]["post"]["requestBody"]["content"]
    model_ref, rules = body["application/json"]["schema"]["allOf"]
    assert model_ref == {"$ref": COMPONENTS + model.__name__}
    required = JSON_RULES[request_type].required
    assert rules["required"] == ["model", *(field for field, _ in required)]


@pytest.mark.parametrize("request_type", list(FORM_RULES))
def test_every_form_is_its_rules(request_type: RequestType) -> None:
    body = DOCUMENT["paths"][f"/v1/async/{PATHS[request_type]}"]["post"]["requestBody"]["content"]
    assert list(body) == ["multipart/form-data"]
    schema = DOCUMENT["components"]["schemas"][f"{request_type.value}_form"]
    for field in FORM_RULES[request_type].file_fields:
        part = schema["properties"][field]
        assert (part["items"] if field.endswith("[]") else part)["format"] == "binary"
    assert ("stream" in schema["properties"]) == (FORM_RULES[request_type].stream_message is not None)


# -- exactly what the validation accepts ------------------------------------------------------------------


def accepted_json(request_type: RequestType, body: dict) -> bool:
    try:
        validate_json_submit(json.dumps(body).encode(), request_type, ENDPOINTS)
    except ApiError as refused:
        assert refused.status == 400
        return False
    return True


def documented_json(request_type: RequestType, body: dict) -> bool:
    content = DOCUMENT["paths"][f"/v1/async/{PATHS[request_type]}"]["post"]["requestBody"]["content"]
    return validator_for(content["application/json"]["schema"]).is_valid(body)


NAMES = ["openai/gpt-4o", "openai/m/with/slashes", "openai/ ", "openai/\n", "openai/", "openai", "/gpt-4o", "",
         " openai/gpt-4o", "OpenAI/gpt-4o", "cohere/rerank", "vllm/x", "nobody/x", "openai/\u00e9"]


@pytest.mark.parametrize("name", NAMES)
def test_the_json_model_and_fallbacks_patterns_say_what_resolves(name: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    for body in ({"model": name, "messages": messages},
                 {"model": "openai/gpt-4o", "fallbacks": [name], "messages": messages}):
        assert documented_json(R.chat_completion, body) == accepted_json(R.chat_completion, body)


@pytest.mark.parametrize("body", [
    {"messages": []}, {"messages": None}, {"messages": [{"role": "user"}], "stream": True},
    {"messages": [{"role": "user"}], "stream": False}, {"messages": [{"content": "no role"}]},
    {"messages": "hi"}, {"messages": [{"role": "user"}], "fallbacks": ["openai/a"] * 10},
    {"messages": [{"role": "user"}], "fallbacks": ["openai/a"] * 11},
])
def test_the_chat_body_says_what_is_accepted(body: dict) -> None:
    body = {"model": "openai/gpt-4o"} | body
    assert documented_json(R.chat_completion, body) == accepted_json(R.chat_completion, body)


@pytest.mark.parametrize("token", [0, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
def test_token_ids_are_the_integers_the_json_parser_reads(token: int) -> None:
    body = {"model": "openai/gpt-3.5-turbo-instruct", "prompt": [token]}
    expected = JSON_INTEGER_RANGE["minimum"] <= token <= JSON_INTEGER_RANGE["maximum"]
    assert documented_json(R.text_completion, body) == accepted_json(R.text_completion, body) == expected


def form_schema(request_type: RequestType) -> dict:
    return DOCUMENT["components"]["schemas"][f"{request_type.value}_form"]


def accepted_form(request_type: RequestType, fields: dict, file: bytes = b"RIFF") -> bool:
    files = (UploadedFile(field="file", filename="a.wav", content_type="audio/wav", data=file),)
    try:
        validate_form_submit(Form(fields=fields, files=files), request_type, ENDPOINTS)
    except ApiError as refused:
        assert refused.status == 400
        return False
    return True


def documented_form(request_type: RequestType, fields: dict, file: bytes = b"RIFF") -> bool:
    return validator_for(form_schema(request_type)).is_valid(fields | {"file": "x" * len(file)})


FORM_VALUES = ["openai/whisper-1", " openai/whisper-1 ", "\x1copenai/whisper-1\x1f", "\x85openai/w", "openai/ ",
               "openai/\x1d", "openai/ \x1dw", "\ufeffopenai/whisper-1", "mistral/x", "openai", ""]


@pytest.mark.parametrize("value", FORM_VALUES)
def test_the_form_model_pattern_says_what_resolves(value: str) -> None:
    fields = {"model": value}
    assert documented_form(R.transcription, fields) == accepted_form(R.transcription, fields)


@pytest.mark.parametrize("value", [
    "openai/a", "openai/a, openai/b", " , ,openai/a,", ",".join(["openai/a"] * 10), ",".join(["openai/a"] * 11),
    "openai/a,nobody/b", "openai/\x1d", "openai/a,openai/ ", "", " ", ",,", "mistral/x",
])
def test_the_form_fallbacks_pattern_says_what_resolves(value: str) -> None:
    fields = {"model": "openai/whisper-1", "fallbacks": value}
    assert documented_form(R.transcription, fields) == accepted_form(R.transcription, fields)


@pytest.mark.parametrize("value", ["true", " TRUE\n", "True", "\x1ctrue", "false", "truex", ""])
def test_the_form_stream_pattern_says_what_is_refused(value: str) -> None:
    fields = {"model": "openai/whisper-1", "stream": value}
    assert documented_form(R.transcription, fields) == accepted_form(R.transcription, fields)


def test_an_empty_file_is_documented_as_refused() -> None:
    fields = {"model": "openai/whisper-1"}
    assert documented_form(R.transcription, fields, b"") is accepted_form(R.transcription, fields, b"") is False


def test_a_part_name_with_a_control_character_is_documented_as_unreadable() -> None:
    names = re.compile(form_schema(R.transcription)["propertyNames"]["pattern"])
    assert names.search("language") and names.search("a\tb") and names.search("caf\u00e9")
    assert not any(names.search(f"a{chr(code)}b") for code in [*range(0x09), *range(0x0a, 0x20), 0x7f])


# -- the shapes the handlers write ------------------------------------------------------------------------


def job_state() -> JobState:
    request = JobRequest(id=str(uuid.uuid4()), request_type=R.chat_completion, created_at=utcnow(), ttl_seconds=60,
                         targets=[Target(provider="openai", model="gpt-4o")], body={}, owner="f" * 64)
    return JobState.pending(request)


def test_the_job_objects_are_as_documented() -> None:
    path = "/v1/async/chat/completions/{job_id}"
    running = validator_for(response_schema(path, "get", "202"))
    ended = validator_for(response_schema(path, "get", "200"))
    pending = job_state()
    processing = pending.processing(RequestLocation(topic="t", partition=0, offset=1))
    retrying = processing.retrying(RetryInfo(target="openai/gpt-4o", attempt=1, status_code=429,
                                             next_attempt_at=utcnow() + timedelta(seconds=2)))
    completed = processing.finished(Outcome(status_code=200, result={"object": "chat.completion"}))
    failed = processing.finished(Outcome(status_code=429, error=ErrorObject(
        is_bifrost_error=False, status_code=429, error=ErrorDetail(message="rate limited", type="rate_limit_error"),
        extra_fields={"provider": "openai"})))
    for state in (pending, processing, retrying):
        running.validate(state.to_wire())
        assert not ended.is_valid(state.to_wire())
    for state in (completed, failed):
        ended.validate(state.to_wire())
        assert not running.is_valid(state.to_wire())
    # The owner's key fingerprint is not part of the job object: the document forbids extra fields.
    assert not running.is_valid(pending.to_wire() | {"owner": pending.owner})


def test_the_submit_answer_is_as_documented() -> None:
    accepted = validator_for(response_schema("/v1/async/chat/completions", "post", "202"))
    accepted.validate({"id": str(uuid.uuid4()), "status": "pending", "created_at": rfc3339(utcnow())})
    assert not accepted.is_valid({"id": "not-a-uuid", "status": "pending", "created_at": rfc3339(utcnow())})


@pytest.mark.parametrize("error", [
    bad_request("model is required"), not_found(), too_large(10), unavailable("kafka", 1, job_id=str(uuid.uuid4())),
])
def test_the_error_object_is_as_documented(error: ApiError) -> None:
    status = str(error.status)
    operation = "get" if status == "404" else "post"
    path = "/v1/async/chat/completions" + ("/{job_id}" if operation == "get" else "")
    validator_for(response_schema(path, operation, status)).validate(error.to_error_object().to_json_dict())


def test_the_health_pages_are_as_documented() -> None:
    validator_for(response_schema("/health/live", "get", "200")).validate({"status": "ok"})
    ready = validator_for(response_schema("/health/ready", "get", "503"))
    ready.validate({"status": "unavailable", "kafka": False, "table_caught_up": True})
