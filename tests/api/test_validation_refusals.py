"""Hostile submits through the real API and broker: each one a 4xx in the contract's error shape,
and nothing queued; the few hostile-looking bodies that are valid (the deepest accepted nesting,
JSON under any Content-Type) are accepted and stored readably.

One API (no worker: nothing is ever called) over topics of this module's own, so that the end
offsets of its request topics and changelog count exactly what was queued.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.routes import PATHS
from api.validation import MAX_BODY_DEPTH, MAX_FORM_PARTS
from app.jobs import JobRequest, RequestType
from app.settings import Settings
from app.topics import changelog_topic, partition_for, request_topic
from tests.helpers import start_api

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]
R = RequestType


@dataclass
class Stack:
    settings: Settings
    api: object
    consumer: AIOKafkaConsumer

    async def queued(self) -> int:
        """Records in this module's request topics and jobs changelog (a job is two)."""
        topics = [request_topic(self.settings, rt) for rt in RequestType] + [changelog_topic(self.settings)]
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(self.settings.topic_partitions)]
        return sum((await self.consumer.end_offsets(partitions)).values())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(kafka_bootstrap):
    name = f"ferry-val{uuid.uuid4().hex[:10]}"
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, app_id=name, topic_prefix=name, topic_partitions=1,
        providers={"openai": {"api_key": "sk-unused"}, "cohere": {"api_key": "co-unused"},
                   "mistral": {"api_key": "mi-unused"}},
    )
    api = await start_api(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        yield Stack(settings, api, consumer)
    finally:
        await consumer.stop()
        await api.close()


def path_of(request_type: RequestType) -> str:
    return f"/v1/async/{PATHS[request_type]}"


def assert_contract_error(status: int, body: dict, message: str, expected_status: int = 400) -> None:
    """The contract's error object; ``message`` ending in ": " (or "...") is a prefix."""
    assert status == expected_status, body
    assert body["is_bifrost_error"] is True and body["status_code"] == expected_status, body
    assert body["extra_fields"] == {} and body["error"]["type"] == "invalid_request_error", body
    actual = body["error"]["message"]
    if message.endswith((": ", "...")):
        assert actual.startswith(message.rstrip(".")), body
    else:
        assert actual == message, body


async def raw_exchange(stack: Stack, head: list[bytes], body: bytes = b"") -> tuple[int, dict]:
    """One HTTP/1.1 exchange written byte for byte: aiohttp's client will not send header bytes
    that are not UTF-8."""
    reader, writer = await asyncio.open_connection(stack.api.server.host, stack.api.server.port)
    try:
        writer.write(b"\r\n".join([*head, b"Host: ferry", b"Content-Length: %d" % len(body), b"Connection: close",
                                   b"", b""]) + body)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), orjson.loads(rest.partition(b"\r\n\r\n")[2])


# -- JSON bodies ----------------------------------------------------------------------------------------------------

VALID_FIELDS = {
    R.text_completion: {"prompt": "hi"},
    R.chat_completion: {"messages": [{"role": "user", "content": "hi"}]},
    R.responses: {"input": "hi"},
    R.embedding: {"input": "hi"},
    R.speech: {"input": "hi", "voice": "alloy"},
    R.image_generation: {"prompt": "a cat"},
    R.rerank: {"query": "q", "documents": ["d"]},
    R.ocr: {"document": {"type": "document_url", "document_url": "https://example.com/a.pdf"}},
}
MODEL_OF = {R.rerank: "cohere/rerank-v3.5", R.ocr: "mistral/mistral-ocr-latest"}


def valid_body(request_type: RequestType, **changes) -> dict:
    return {"model": MODEL_OF.get(request_type, "openai/some-model"), **VALID_FIELDS[request_type], **changes}


def with_fields(**changes):
    """A case body: the request type's valid body with ``changes``."""
    return lambda request_type: orjson.dumps(valid_body(request_type, **changes))


def nested(depth: int):
    """A valid body with an extra field that makes it ``depth`` levels deep (the body is level 1)."""
    def body(request_type: RequestType) -> bytes:
        raw = orjson.dumps(valid_body(request_type))
        return raw[:-1] + b', "extra": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"
    return body


def spliced(text: bytes):
    """A valid body with ``text`` spliced in as a last field, byte for byte."""
    return lambda request_type: orjson.dumps(valid_body(request_type))[:-1] + b", " + text + b"}"


NOT_AN_OBJECT = "invalid request format: the body must be a JSON object"
NOT_A_STRING = "Input should be a valid string"
NOT_A_LIST = "Input should be a valid list"
BAD_FORMAT = "invalid request format: "
TOO_DEEP = f"invalid request format: nested deeper than {MAX_BODY_DEPTH} levels"
# (id, body for a request type, expected message or prefix)
HOSTILE_JSON = [
    ("empty-body", lambda rt: b"", BAD_FORMAT),
    ("null", lambda rt: b"null", NOT_AN_OBJECT),
    ("array", lambda rt: b'[{"model": "openai/x"}]', NOT_AN_OBJECT),
    ("string", lambda rt: b'"hello"', NOT_AN_OBJECT),
    ("number", lambda rt: b"42", NOT_AN_OBJECT),
    ("truncated", lambda rt: orjson.dumps(valid_body(rt))[:-1], BAD_FORMAT),
    ("nan", spliced(b'"temperature": NaN'), BAD_FORMAT),
    ("infinity", spliced(b'"temperature": -Infinity'), BAD_FORMAT),
    ("number-overflow", spliced(b'"temperature": 1e999'), BAD_FORMAT),
    ("bom", lambda rt: b"\xef\xbb\xbf" + orjson.dumps(valid_body(rt)), BAD_FORMAT),
    ("invalid-utf8-in-string", spliced(b'"user": "caf\xe9"'), BAD_FORMAT),
    ("invalid-utf8-in-key", spliced(b'"us\xffer": "x"'), BAD_FORMAT),
    ("lone-surrogate-escape", spliced(b'"user": "\\ud800"'), BAD_FORMAT),
    ("lone-low-surrogate-escape", spliced(b'"user": "x\\udc00y"'), BAD_FORMAT),
    ("nested-one-too-deep", nested(MAX_BODY_DEPTH + 1), TOO_DEEP),
    ("nested-256", nested(256), TOO_DEEP),
    ("nested-1023", nested(1_023), TOO_DEEP),
    ("nested-10000", nested(10_000), BAD_FORMAT),
    ("model-number", with_fields(model=5), f"{BAD_FORMAT}model: {NOT_A_STRING}"),
    ("model-object", with_fields(model={"provider": "openai"}), f"{BAD_FORMAT}model: {NOT_A_STRING}"),
    ("model-list", with_fields(model=["openai/x"]), f"{BAD_FORMAT}model: {NOT_A_STRING}"),
    ("model-bool", with_fields(model=True), f"{BAD_FORMAT}model: {NOT_A_STRING}"),
    ("model-null", with_fields(model=None), "model is required"),
    ("model-huge", with_fields(model="x" * 1_000_000), "model must be in the form provider/model, got 'xxxxx..."),
    ("provider-huge", with_fields(model="x" * 1_000_000 + "/m"), "unknown provider: xxxxx..."),
    ("fallbacks-number", with_fields(fallbacks=5), f"{BAD_FORMAT}fallbacks: {NOT_A_LIST}"),
    ("fallbacks-object", with_fields(fallbacks={"openai/x": 1}), f"{BAD_FORMAT}fallbacks: {NOT_A_LIST}"),
    ("fallbacks-string", with_fields(fallbacks="openai/x"), f"{BAD_FORMAT}fallbacks: {NOT_A_LIST}"),
    ("fallbacks-numbers", with_fields(fallbacks=[1, 2]), f"{BAD_FORMAT}fallbacks.0: {NOT_A_STRING}"),
    ("fallbacks-null-item", with_fields(fallbacks=[None]), f"{BAD_FORMAT}fallbacks.0: {NOT_A_STRING}"),
    ("fallbacks-20000", with_fields(fallbacks=["openai/x"] * 20_000), "at most 10 fallbacks are allowed, got 20000"),
    ("fallbacks-11", with_fields(fallbacks=["openai/x"] * 11), "at most 10 fallbacks are allowed, got 11"),
]
JSON_TYPES = list(VALID_FIELDS)


@pytest.mark.parametrize("request_type", JSON_TYPES, ids=[rt.value for rt in JSON_TYPES])
@pytest.mark.parametrize("make_body, message", [case[1:] for case in HOSTILE_JSON],
                         ids=[case[0] for case in HOSTILE_JSON])
async def test_hostile_json_body_is_refused_and_queues_nothing(stack: Stack, request_type, make_body, message) -> None:
    before = await stack.queued()
    response = await stack.api.post(path_of(request_type), data=make_body(request_type),
                                    headers={"Content-Type": "application/json"})
    body = await response.json()
    assert_contract_error(response.status, body, message)
    assert len(body["error"]["message"]) < 300  # a huge name is not echoed back whole
    assert await stack.queued() == before


WRONG_TYPES = [  # the cases first: Bifrost refuses each while decoding into its typed structs
    (R.chat_completion, {"messages": "hi"}, "invalid request format: messages: Input should be a valid list"),
    (R.chat_completion, {"messages": 42}, "invalid request format: messages: Input should be a valid list"),
    (R.chat_completion, {"messages": {"role": "user", "content": "hi"}},
     "invalid request format: messages: Input should be a valid list"),
    (R.chat_completion, {"messages": [1, 2]}, "invalid request format: messages.0: Input should be a valid object"),
    (R.chat_completion, {"messages": [{"role": "user", "content": 5}]}, "invalid request format: messages.0.content: "),
    (R.chat_completion, {"stream": "true"}, "invalid request format: stream: Input should be a valid boolean"),
    (R.text_completion, {"prompt": {"text": "hi"}}, "invalid request format: prompt: "),
    (R.responses, {"input": 5}, "invalid request format: input: "),
    (R.embedding, {"input": [None]}, "invalid request format: input: "),
    (R.speech, {"voice": ["alloy"]}, "invalid request format: voice: "),
    (R.speech, {"stream_format": 1}, "invalid request format: stream_format: Input should be a valid string"),
    (R.image_generation, {"prompt": 5}, "invalid request format: prompt: Input should be a valid string"),
    (R.rerank, {"documents": [None]}, "invalid request format: documents.0: "),
    (R.ocr, {"document": ["https://example.com/a.pdf"]},
     "invalid request format: document: Input should be a valid object"),
]


@pytest.mark.parametrize("request_type, changes, message", WRONG_TYPES,
                         ids=[f"{rt.value}-{i}" for i, (rt, *_) in enumerate(WRONG_TYPES)])
async def test_known_field_of_the_wrong_type_is_refused_and_queues_nothing(stack: Stack, request_type, changes,
                                                                            message) -> None:
    before = await stack.queued()
    response = await stack.api.post(path_of(request_type), json=valid_body(request_type, **changes))
    assert_contract_error(response.status, await response.json(), message)
    assert await stack.queued() == before


async def record_of(stack: Stack, request_type: RequestType, job_id: str) -> JobRequest:
    """The job's request as a worker reads it from its request topic."""
    tp = TopicPartition(request_topic(stack.settings, request_type),
                        partition_for(job_id, stack.settings.topic_partitions))
    reader = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap_servers, auto_offset_reset="earliest")
    await reader.start()
    try:
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        while await reader.position(tp) < end:
            for record in (await reader.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.key == job_id.encode():
                    return JobRequest.from_bytes(record.value)
    finally:
        await reader.stop()
    raise AssertionError(f"no request record for job {job_id}")


async def test_the_deepest_accepted_body_is_queued_readably_and_one_level_more_is_refused(stack: Stack) -> None:
    raw = nested(MAX_BODY_DEPTH)(R.chat_completion)
    response = await stack.api.post(path_of(R.chat_completion), data=raw, headers={"Content-Type": "application/json"})
    assert response.status == 202, await response.text()
    job = await record_of(stack, R.chat_completion, (await response.json())["id"])
    assert job.body == {key: value for key, value in orjson.loads(raw).items() if key != "model"}

    before = await stack.queued()
    response = await stack.api.post(path_of(R.chat_completion), data=nested(MAX_BODY_DEPTH + 1)(R.chat_completion),
                                    headers={"Content-Type": "application/json"})
    assert_contract_error(response.status, await response.json(), TOO_DEEP)
    assert await stack.queued() == before


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/json"])
async def test_json_routes_do_not_consult_the_content_type(stack: Stack, content_type) -> None:
    # As on Bifrost, the body must simply be JSON: `curl -d` sends application/x-www-form-urlencoded.
    before = await stack.queued()
    headers = {"Content-Type": content_type} if content_type else {}
    response = await stack.api.post(path_of(R.chat_completion), data=orjson.dumps(valid_body(R.chat_completion)),
                                    headers=headers, skip_auto_headers=["Content-Type"])
    assert response.status == 202, await response.text()
    assert await stack.queued() == before + 2  # the pending state and the request
    response = await stack.api.post(path_of(R.chat_completion), data=b"model=openai/x", headers=headers,
                                    skip_auto_headers=["Content-Type"])
    assert_contract_error(response.status, await response.json(), BAD_FORMAT)


# -- multipart forms ------------------------------------------------------------------------------------------------

BOUNDARY = b"ferry-boundary"


def multipart(*parts: tuple[list[bytes], bytes], boundary: bytes = BOUNDARY) -> bytes:
    """A multipart body written byte for byte: (part header lines, content) each."""
    out = b""
    for headers, content in parts:
        out += b"--" + boundary + b"\r\n" + b"".join(line + b"\r\n" for line in headers) + b"\r\n" + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def field(name: bytes, value: bytes, *more_headers: bytes) -> tuple[list[bytes], bytes]:
    return [b'Content-Disposition: form-data; name="' + name + b'"', *more_headers], value


def upload(name: bytes = b"file", filename: bytes = b'filename="a.wav"', content_type: bytes = b"audio/wav"):
    return [b'Content-Disposition: form-data; name="' + name + b'"; ' + filename,
            b"Content-Type: " + content_type], b"RIFF0000WAVE"


MULTIPART = "multipart/form-data; boundary=" + BOUNDARY.decode()
URLENCODED = "application/x-www-form-urlencoded"
MODEL = field(b"model", b"openai/whisper-1")
FORM_FAILURE = "failed to parse multipart form: "
# (id, request type, Content-Type, body, expected message or prefix)
HOSTILE_FORMS = [
    ("part-name-control-character", R.transcription, MULTIPART,
     multipart(MODEL, ([b'Content-Disposition: form-data; name="a\x07b"'], b"v"), upload()),
     "failed to parse multipart form: malformed part header"),
    ("filename-not-utf8", R.transcription, MULTIPART, multipart(MODEL, upload(filename=b'filename="caf\xe9.wav"')),
     "failed to parse multipart form: the filename of part file is not valid UTF-8"),
    ("filename-star-lone-surrogate", R.transcription, MULTIPART,
     multipart(MODEL, upload(filename=b"filename*=unicode_escape''%5Cud800.wav")),
     "failed to parse multipart form: the filename of part file is not valid UTF-8"),
    ("part-content-type-not-utf8", R.image_edit, MULTIPART,
     multipart(field(b"model", b"openai/gpt-image-1"), upload(b"image", b'filename="a.png"', b"image/\xff")),
     "failed to parse multipart form: the content type of part image is not valid UTF-8"),
    ("field-name-not-utf8", R.transcription, MULTIPART, multipart(MODEL, upload(), field(b"lang\xffuage", b"en")),
     "failed to parse multipart form: a part's name is not valid UTF-8"),
    ("field-value-not-utf8", R.transcription, MULTIPART, multipart(MODEL, upload(), field(b"language", b"\xff")),
     "failed to parse multipart form: field language is not valid utf-8"),
    ("field-value-lone-surrogate", R.transcription, MULTIPART,
     multipart(MODEL, upload(), field(b"language", b"\\ud800", b"Content-Type: text/plain; charset=unicode_escape")),
     "failed to parse multipart form: field language is not valid UTF-8"),
    ("field-unknown-charset", R.transcription, MULTIPART,
     multipart(MODEL, upload(), field(b"language", b"en", b"Content-Type: text/plain; charset=nosuch")),
     FORM_FAILURE),
    ("nested-multipart-part", R.transcription, MULTIPART,
     multipart(MODEL, upload(),
               field(b"inner", b"--in\r\n\r\nx\r\n--in--", b"Content-Type: multipart/mixed; boundary=in")),
     "failed to parse multipart form: a part is itself a multipart body"),
    ("empty-boundary", R.transcription, "multipart/form-data; boundary=", multipart(MODEL, upload(), boundary=b""),
     "failed to parse multipart form: the boundary is empty"),
    ("empty-quoted-boundary", R.transcription, 'multipart/form-data; boundary=""',
     multipart(MODEL, upload(), boundary=b""),
     "failed to parse multipart form: the boundary is empty"),
    ("no-boundary", R.transcription, "multipart/form-data", multipart(MODEL, upload()), FORM_FAILURE),
    ("part-without-name", R.transcription, MULTIPART,
     multipart(MODEL, upload(), ([b"Content-Disposition: form-data"], b"x")),
     "failed to parse multipart form: a part has no name"),
    ("too-many-parts", R.transcription, MULTIPART,
     multipart(MODEL, upload(), *[field(b"p", b"")] * MAX_FORM_PARTS),
     f"failed to parse multipart form: more than {MAX_FORM_PARTS} parts"),
    ("not-a-form", R.image_variation, MULTIPART, b"garbage", FORM_FAILURE),
    ("fallbacks-11-repeated", R.transcription, MULTIPART,
     multipart(MODEL, upload(), *[field(b"fallbacks", b"openai/whisper-1")] * 11),
     "at most 10 fallbacks are allowed, got 11"),
    ("fallbacks-11-comma-separated", R.transcription, MULTIPART,
     multipart(MODEL, upload(), field(b"fallbacks", b",".join([b"openai/whisper-1"] * 11))),
     "at most 10 fallbacks are allowed, got 11"),
    ("urlencoded-unknown-charset", R.transcription, URLENCODED + "; charset=nosuch", b"model=openai%2Fwhisper-1",
     "failed to parse multipart form: unknown charset 'nosuch'"),
    ("urlencoded-not-utf8", R.transcription, URLENCODED, b"model=openai/whisper-1&language=\xff",
     "failed to parse multipart form: the form is not valid utf-8"),
    ("urlencoded-escape-not-utf8", R.image_edit, URLENCODED, b"model=openai/gpt-image-1&prompt=%ff",
     "failed to parse multipart form: the form is not valid utf-8"),
    ("urlencoded-lone-surrogate", R.transcription, URLENCODED + "; charset=unicode_escape",
     b"model=openai/whisper-1&language=\\ud800", "failed to parse multipart form: field language is not valid UTF-8"),
    ("urlencoded-too-many-fields", R.transcription, URLENCODED, b"model=openai/whisper-1" + b"&a=" * MAX_FORM_PARTS,
     f"failed to parse multipart form: more than {MAX_FORM_PARTS} fields"),
]


@pytest.mark.parametrize("request_type, content_type, raw, message", [case[1:] for case in HOSTILE_FORMS],
                         ids=[case[0] for case in HOSTILE_FORMS])
async def test_hostile_form_is_refused_and_queues_nothing(stack: Stack, request_type, content_type, raw,
                                                          message) -> None:
    before = await stack.queued()
    response = await stack.api.post(path_of(request_type), data=raw, headers={"Content-Type": content_type})
    assert_contract_error(response.status, await response.json(), message)
    assert await stack.queued() == before


async def test_a_form_at_the_part_limit_is_accepted(stack: Stack) -> None:
    before = await stack.queued()
    raw = multipart(MODEL, upload(), *[field(b"p", b"")] * (MAX_FORM_PARTS - 2))
    response = await stack.api.post(path_of(R.transcription), data=raw, headers={"Content-Type": MULTIPART})
    assert response.status == 202, await response.text()
    assert await stack.queued() == before + 2


# -- service keys ----------------------------------------------------------------------------------------------------

BAD_KEYS = [b"x-bf-vk: sk-bf-caf\xe9", b"Authorization: Bearer sk-bf-\xff\xfe", b"x-api-key: sk-bf-a\xc3",
            b"x-goog-api-key: sk-bf-\x80"]
KEY_REFUSAL = "invalid service key: not valid UTF-8"


@pytest.mark.parametrize("key_header", BAD_KEYS, ids=["x-bf-vk", "bearer", "x-api-key", "x-goog-api-key"])
async def test_a_service_key_that_is_not_utf8_is_refused_on_submit_and_poll(stack: Stack, key_header: bytes) -> None:
    before = await stack.queued()
    status, body = await raw_exchange(stack, [b"POST /v1/async/chat/completions HTTP/1.1", key_header,
                                              b"Content-Type: application/json"],
                                      orjson.dumps(valid_body(R.chat_completion)))
    assert_contract_error(status, body, KEY_REFUSAL)
    assert await stack.queued() == before

    response = await stack.api.post(path_of(R.chat_completion), json=valid_body(R.chat_completion),
                                    headers={"x-bf-vk": "sk-bf-alice"})
    assert response.status == 202
    job_id = (await response.json())["id"]
    status, body = await raw_exchange(stack, [f"GET /v1/async/chat/completions/{job_id} HTTP/1.1".encode(), key_header])
    assert_contract_error(status, body, KEY_REFUSAL)


async def test_keys_in_utf8_and_provider_keys_with_other_bytes_are_not_refused(stack: Stack) -> None:
    key = "sk-bf-clé-ключ".encode()
    status, accepted = await raw_exchange(stack, [b"POST /v1/async/chat/completions HTTP/1.1", b"x-bf-vk: " + key,
                                                  b"Content-Type: application/json"],
                                          orjson.dumps(valid_body(R.chat_completion)))
    assert status == 202, accepted
    poll = f"GET /v1/async/chat/completions/{accepted['id']} HTTP/1.1".encode()
    status, job = await raw_exchange(stack, [poll, b"Authorization: Bearer " + key])
    assert status == 202 and job["id"] == accepted["id"]
    status, refused = await raw_exchange(stack, [poll, "x-bf-vk: sk-bf-clé".encode()])
    assert status == 404 and refused["error"]["message"] == "virtual key mismatch"
    # Not a service key (no sk-bf- prefix): not Ferry's to read, so not Ferry's to refuse.
    status, accepted = await raw_exchange(stack, [b"POST /v1/async/chat/completions HTTP/1.1",
                                                  b"Authorization: Bearer provider-\xff",
                                                  b"Content-Type: application/json"],
                                          orjson.dumps(valid_body(R.chat_completion)))
    assert status == 202, accepted


ODD_HEADERS = [  # (request line, odd header, body, expected message or prefix)
    (b"POST /v1/async/audio/transcriptions HTTP/1.1", b"Content-Type: multipart/form-data; boundary=ab\xffc",
     b"--ab\xffc\r\n\r\n--ab\xffc--\r\n", FORM_FAILURE),
    (b"POST /v1/async/audio/transcriptions HTTP/1.1", b"Content-Type: application/x-www-form-urlencoded; charset=\xff",
     b"model=openai/whisper-1", "failed to parse multipart form: unknown charset ..."),
    (b"POST /v1/async/chat/completions HTTP/1.1", b"x-bf-async-webhook: hook\xff",
     orjson.dumps(valid_body(R.chat_completion)), "webhook endpoint ..."),
]


@pytest.mark.parametrize("request_line, header, raw, message", ODD_HEADERS, ids=["boundary", "charset", "webhook"])
async def test_other_headers_with_bytes_that_are_not_utf8_are_refused_not_failed(stack: Stack, request_line, header,
                                                                                 raw, message) -> None:
    before = await stack.queued()
    status, body = await raw_exchange(stack, [request_line, header], raw)
    assert_contract_error(status, body, message)
    assert await stack.queued() == before
