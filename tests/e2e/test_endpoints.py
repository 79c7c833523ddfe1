"""Every request type end to end, against every provider family's fake, through the real broker.

One stack for the module (fake providers, API, worker, topics of its own), since each test is
a few jobs: happy paths checked with the official SDK models, refusals that queue nothing,
stream refusals, provider errors, multipart files byte for byte, and fallbacks.
"""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
import wave
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from openai.types import Completion, CreateEmbeddingResponse, ImagesResponse
from openai.types.audio import Transcription
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from api.routes import PATHS
from app.jobs import RequestType
from app.settings import Settings
from app.topics import changelog_topic, request_topic
from deploy.fakes.anthropic_server import FakeAnthropic
from deploy.fakes.base import FakeProvider
from deploy.fakes.cohere_server import FakeCohere
from deploy.fakes.gemini_server import FakeGemini
from deploy.fakes.media import png_bytes, wav_bytes
from deploy.fakes.openai_server import FakeAzureOpenAI, FakeMistral, FakeOpenAI
from tests.helpers import PROVIDER_KEY, end_offsets, poll_until_done, start_api, worker_running

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]
R = RequestType
PNG = png_bytes(16, 16, (10, 120, 250))


@dataclass
class Stack:
    settings: Settings
    api: object
    openai: FakeOpenAI
    azure: FakeAzureOpenAI
    anthropic: FakeAnthropic
    gemini: FakeGemini
    cohere: FakeCohere
    mistral: FakeMistral

    def fakes(self) -> list[FakeProvider]:
        return [self.openai, self.azure, self.anthropic, self.gemini, self.cohere, self.mistral]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(kafka_bootstrap):
    fakes = [await cls(api_key=PROVIDER_KEY).start()
             for cls in (FakeOpenAI, FakeAzureOpenAI, FakeAnthropic, FakeGemini, FakeCohere, FakeMistral)]
    openai, azure, anthropic, gemini, cohere, mistral = fakes
    name = f"ferry-ep{uuid.uuid4().hex[:10]}"
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, app_id=name, topic_prefix=name, topic_partitions=2,
        worker_maintenance_interval_seconds=0.5, retry_initial_backoff_seconds=0.05, retry_max_attempts=2,
        providers={
            "openai": {"base_url": openai.base_url, "api_key": PROVIDER_KEY},
            "azure": {"base_url": azure.root_url, "api_key": PROVIDER_KEY, "api_version": "2024-10-21"},
            "anthropic": {"base_url": anthropic.base_url, "api_key": PROVIDER_KEY},
            "gemini": {"base_url": gemini.base_url, "api_key": PROVIDER_KEY},
            "cohere": {"base_url": cohere.base_url, "api_key": PROVIDER_KEY},
            "mistral": {"base_url": mistral.base_url, "api_key": PROVIDER_KEY},
            "together": {"base_url": openai.base_url, "api_key": PROVIDER_KEY},
            "corp": {"base_url": openai.base_url, "api_key": PROVIDER_KEY},  # a custom provider
        },
    )
    api = await start_api(settings)
    try:
        async with worker_running(settings):
            yield Stack(settings, api, *fakes)
    finally:
        await api.close()
        for fake in fakes:
            await fake.stop()


def path_of(request_type: RequestType) -> str:
    return f"/v1/async/{PATHS[request_type]}"


def form(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for key, value in fields.items():
        data.add_field(key, value)
    for key, (filename, content, content_type) in files.items():
        data.add_field(key, content, filename=filename, content_type=content_type)
    return data


async def run_job(stack: Stack, request_type: RequestType, body=None, files=None) -> dict:
    """Submit (JSON, or a form when ``files`` is given), then poll until the job ends."""
    payload = {"data": form(body, files)} if files is not None else {"json": body}
    response = await stack.api.post(path_of(request_type), **payload)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    return await poll_until_done(stack.api, accepted["id"], path_of(request_type), timeout=90)


def completed(job: dict, provider: str, model: str, request_type: RequestType) -> dict:
    assert job["status"] == "completed", job
    assert job["status_code"] == 200
    result = job["result"]
    assert result["extra_fields"] == {"provider": provider, "model_requested": model,
                                      "request_type": request_type.value}
    return result


# -- happy paths, JSON ---------------------------------------------------------------------------------------

async def test_text_completion(stack: Stack) -> None:
    job = await run_job(stack, R.text_completion, {"model": "openai/gpt-3.5-turbo-instruct", "prompt": "hello"})
    result = Completion.model_validate(completed(job, "openai", "gpt-3.5-turbo-instruct", R.text_completion))
    assert result.choices[0].text == "echo: hello"
    assert stack.openai.requests[-1].path == "/v1/completions"


async def test_responses(stack: Stack) -> None:
    job = await run_job(stack, R.responses, {"model": "openai/gpt-4.1", "input": "hello", "instructions": "brief"})
    result = Response.model_validate(completed(job, "openai", "gpt-4.1", R.responses))
    assert result.output_text == "echo: hello"
    assert stack.openai.requests[-1].body == {"model": "gpt-4.1", "input": "hello", "instructions": "brief"}


@pytest.mark.parametrize("provider, model, fake", [
    ("openai", "text-embedding-3-small", "openai"), ("gemini", "text-embedding-004", "gemini"),
    ("cohere", "embed-v4.0", "cohere"), ("mistral", "mistral-embed", "mistral"),
])
async def test_embeddings(stack: Stack, provider: str, model: str, fake: str) -> None:
    job = await run_job(stack, R.embedding, {"model": f"{provider}/{model}", "input": ["first", "second"]})
    result = completed(job, provider, model, R.embedding)
    if provider != "gemini":  # Gemini reports no token usage for embeddings
        CreateEmbeddingResponse.model_validate(result)
    assert [item["index"] for item in result["data"]] == [0, 1]
    assert result["data"][0]["embedding"] != result["data"][1]["embedding"]
    assert getattr(stack, fake).requests[-1].headers  # the call reached that provider's fake


async def test_speech_result_is_base64_audio(stack: Stack) -> None:
    job = await run_job(stack, R.speech, {"model": "openai/tts-1", "input": "hello world", "voice": "alloy",
                                          "response_format": "wav"})
    result = completed(job, "openai", "tts-1", R.speech)
    audio = base64.b64decode(result["audio"])
    assert result["content_type"] == "audio/wav"
    with wave.open(io.BytesIO(audio)) as heard:
        assert heard.getnframes() > 0


async def test_image_generation(stack: Stack) -> None:
    job = await run_job(stack, R.image_generation, {"model": "openai/dall-e-3", "prompt": "a cat", "n": 2})
    result = ImagesResponse.model_validate(completed(job, "openai", "dall-e-3", R.image_generation))
    assert len(result.data) == 2 and base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")


@pytest.mark.parametrize("provider, model", [("cohere", "rerank-v3.5"), ("together", "Salesforce/Llama-Rank-V1")])
async def test_rerank(stack: Stack, provider: str, model: str) -> None:
    body = {"model": f"{provider}/{model}", "query": "cats purr", "documents": ["dogs bark", "cats purr loudly"],
            "top_n": 1, "return_documents": True}
    if provider == "together":
        body.pop("return_documents")  # Together returns documents by itself
    result = completed(await run_job(stack, R.rerank, body), provider, model, R.rerank)
    assert [(item["index"], item["document"]["text"]) for item in result["results"]] == [(1, "cats purr loudly")]


async def test_ocr_with_mistral(stack: Stack) -> None:
    document = {"type": "document_url", "document_url": "https://example.com/report.pdf"}
    job = await run_job(stack, R.ocr, {"model": "mistral/mistral-ocr-latest", "document": document})
    result = completed(job, "mistral", "mistral-ocr-latest", R.ocr)
    assert "https://example.com/report.pdf" in result["pages"][0]["markdown"]
    assert stack.mistral.requests[-1].path == "/v1/ocr"


@pytest.mark.parametrize("provider, model", [
    ("anthropic", "claude-sonnet-4-5"), ("gemini", "gemini-2.0-flash"), ("azure", "prod-gpt4o"),
    ("corp", "meta-llama/llama-3"),
])
async def test_chat_with_each_family(stack: Stack, provider: str, model: str) -> None:
    body = {"model": f"{provider}/{model}", "max_tokens": 64,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]}
    result = ChatCompletion.model_validate(completed(await run_job(stack, R.chat_completion, body),
                                                     provider, model, R.chat_completion))
    assert result.choices[0].message.content == "echo: hello"
    assert result.choices[0].finish_reason == "stop"


async def test_anthropic_tool_call_round_trip(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    body = {"model": "anthropic/claude-sonnet-4-5", "tools": tools,
            "messages": [{"role": "user", "content": "please use lookup for cats"}]}
    result = ChatCompletion.model_validate(completed(await run_job(stack, R.chat_completion, body),
                                                     "anthropic", "claude-sonnet-4-5", R.chat_completion))
    [call] = result.choices[0].message.tool_calls
    assert result.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
    answer = {"model": "anthropic/claude-sonnet-4-5", "tools": tools, "messages": [
        body["messages"][0], result.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "cats purr"}]}
    follow_up = completed(await run_job(stack, R.chat_completion, answer), "anthropic", "claude-sonnet-4-5",
                          R.chat_completion)
    assert follow_up["choices"][0]["finish_reason"] == "stop"
    sent = stack.anthropic.requests[-1].body["messages"][-1]["content"]
    assert sent == [{"type": "tool_result", "tool_use_id": call.id, "content": "cats purr"}]


# -- happy paths, multipart ------------------------------------------------------------------------------------

async def test_transcription_carries_the_audio_byte_for_byte(stack: Stack) -> None:
    audio = wav_bytes(3.0)
    job = await run_job(stack, R.transcription, {"model": "openai/whisper-1", "language": "en"},
                        {"file": ("speech.wav", audio, "audio/wav")})
    result = Transcription.model_validate(completed(job, "openai", "whisper-1", R.transcription))
    assert result.text == f"heard {len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()}"
    received = stack.openai.requests[-1]
    assert received.path == "/v1/audio/transcriptions"
    assert received.body == {"model": "whisper-1", "language": "en"}
    [upload] = received.files["file"]
    assert (upload.filename, upload.content_type, upload.data) == ("speech.wav", "audio/wav", audio)


async def test_transcription_as_text_format(stack: Stack) -> None:
    job = await run_job(stack, R.transcription, {"model": "openai/whisper-1", "response_format": "text"},
                        {"file": ("a.wav", wav_bytes(0.5), "audio/wav")})
    assert completed(job, "openai", "whisper-1", R.transcription)["text"].startswith("heard ")


@pytest.mark.parametrize("request_type, fields, part", [
    (R.image_edit, {"model": "openai/gpt-image-1", "prompt": "make it blue"}, "image"),
    (R.image_variation, {"model": "openai/dall-e-2", "n": "1"}, "image"),
])
async def test_image_forms_carry_the_png_byte_for_byte(stack: Stack, request_type, fields, part) -> None:
    job = await run_job(stack, request_type, fields, {part: ("cat.png", PNG, "image/png")})
    result = ImagesResponse.model_validate(completed(job, "openai", fields["model"].split("/", 1)[1], request_type))
    assert base64.b64decode(result.data[0].b64_json) == PNG  # the fake answers with the image it got
    [upload] = stack.openai.requests[-1].files[part]
    assert (upload.filename, upload.content_type, upload.data) == ("cat.png", "image/png", PNG)


@pytest.mark.timeout(300)
async def test_a_25_mb_audio_file_goes_through_kafka_intact(stack: Stack) -> None:
    audio = wav_bytes(780.0)  # 24.96 MB, just under OpenAI's 25 MB limit
    assert 24_000_000 < len(audio) <= 25 * 1024 * 1024
    job = await run_job(stack, R.transcription, {"model": "openai/whisper-1"},
                        {"file": ("long.wav", audio, "audio/wav")})
    completed(job, "openai", "whisper-1", R.transcription)
    assert stack.openai.requests[-1].files["file"][0].data == audio


# -- refusals: nothing queued ------------------------------------------------------------------------------------

JSON_REFUSALS = [
    (R.text_completion, {"model": "openai/x"}, "prompt is required for text completion"),
    (R.text_completion, {"model": "openai/x", "prompt": "p", "stream": True},
     "stream is not supported for async text completions"),
    (R.chat_completion, {"model": "openai/x", "messages": []}, "messages is required for chat completion"),
    (R.chat_completion, {"model": "cohere/x", "messages": [{"role": "user", "content": "x"}]},
     "provider cohere does not support chat_completion requests"),
    (R.responses, {"model": "openai/x"}, "input is required for responses"),
    (R.responses, {"model": "openai/x", "input": "i", "stream": True}, "stream is not supported for async responses"),
    (R.embedding, {"input": "x"}, "model is required"),
    (R.embedding, {"model": "openai/x", "input": ""}, "input is required for embeddings"),
    (R.embedding, {"model": "anthropic/x", "input": "x"}, "provider anthropic does not support embedding requests"),
    (R.speech, {"model": "openai/x", "voice": "alloy"}, "input is required for speech completion"),
    (R.speech, {"model": "openai/x", "input": "i"}, "voice is required for speech completion"),
    (R.speech, {"model": "openai/x", "input": "i", "voice": "v", "stream_format": "sse"},
     "stream is not supported for async speech"),
    (R.image_generation, {"model": "openai/x"}, "prompt is required for image generation"),
    (R.image_generation, {"model": "openai/x", "prompt": "p", "stream": True},
     "stream is not supported for async image generations"),
    (R.rerank, {"model": "cohere/x", "documents": ["d"]}, "query is required for rerank"),
    (R.rerank, {"model": "cohere/x", "query": "q"}, "documents is required for rerank"),
    (R.rerank, {"model": "openai/x", "query": "q", "documents": ["d"]},
     "provider openai does not support rerank requests"),
    (R.ocr, {"model": "mistral/x"}, "document is required for ocr"),
    (R.ocr, {"model": "vertex/x", "document": {"type": "document_url", "document_url": "u"}},
     "provider vertex is not configured"),
]
JSON_REFUSALS_TYPES = sorted({rt for rt, *_ in JSON_REFUSALS}, key=lambda rt: rt.value)
FORM_REFUSALS = [
    (R.transcription, {"language": "en"}, {"file": ("a.wav", b"RIFF", "audio/wav")}, "model is required"),
    (R.transcription, {"model": "openai/whisper-1"}, {}, "file is required"),
    (R.transcription, {"model": "openai/whisper-1", "stream": "true"}, {"file": ("a.wav", b"RIFF", "audio/wav")},
     "stream is not supported for async transcriptions"),
    (R.image_edit, {"model": "openai/gpt-image-1", "prompt": "p"}, {}, "at least one image is required"),
    (R.image_edit, {"model": "openai/gpt-image-1", "stream": "true"}, {"image": ("a.png", PNG, "image/png")},
     "stream is not supported for async image edits"),
    (R.image_variation, {"model": "openai/dall-e-2"}, {}, "image is required"),
    (R.image_variation, {"model": "gemini/x"}, {"image": ("a.png", PNG, "image/png")},
     "provider gemini does not support image_variation requests"),
]


async def queued(stack: Stack) -> int:
    topics = [request_topic(stack.settings, rt) for rt in RequestType] + [changelog_topic(stack.settings)]
    return sum([await end_offsets(stack.settings, topic) for topic in topics])


def assert_refusal(status: int, body: dict, message: str) -> None:
    assert status == 400, body
    assert body["error"]["message"] == message
    assert body["is_bifrost_error"] is True and body["extra_fields"] == {}


async def test_refusals_queue_nothing(stack: Stack) -> None:
    before = await queued(stack)
    for request_type, body, message in JSON_REFUSALS:
        response = await stack.api.post(path_of(request_type), json=body)
        assert_refusal(response.status, await response.json(), message)
    for request_type in JSON_REFUSALS_TYPES:
        response = await stack.api.post(path_of(request_type), data=b"{not json",
                                        headers={"Content-Type": "application/json"})
        body = await response.json()
        assert response.status == 400 and body["error"]["message"].startswith("invalid request format: "), body
    for request_type, fields, files, message in FORM_REFUSALS:
        response = await stack.api.post(path_of(request_type), data=form(fields, files))
        assert_refusal(response.status, await response.json(), message)
    for request_type in (R.transcription, R.image_edit, R.image_variation):
        response = await stack.api.post(path_of(request_type), json={"model": "openai/whisper-1"})
        body = await response.json()
        assert response.status == 400 and body["error"]["message"].startswith("failed to parse multipart form: "), body
    assert await queued(stack) == before



async def test_oversized_upload_is_413_and_queues_nothing(stack: Stack) -> None:
    before = await queued(stack)
    audio = b"\x00" * (stack.settings.max_upload_bytes + 1)
    response = await stack.api.post(path_of(R.transcription),
                                    data=form({"model": "openai/whisper-1"}, {"file": ("big.wav", audio, "audio/wav")}))
    body = await response.json()
    assert response.status == 413 and body["error"]["message"].startswith("request body too large"), body
    assert await queued(stack) == before


# -- provider errors ---------------------------------------------------------------------------------------------

ERROR_CASES = [
    (R.text_completion, "openai", {"model": "openai/x", "prompt": "p"}, None),
    (R.chat_completion, "anthropic", {"model": "anthropic/x", "messages": [{"role": "user", "content": "x"}]}, None),
    (R.chat_completion, "gemini", {"model": "gemini/x", "messages": [{"role": "user", "content": "x"}]}, None),
    (R.chat_completion, "azure", {"model": "azure/x", "messages": [{"role": "user", "content": "x"}]}, None),
    (R.responses, "openai", {"model": "openai/x", "input": "i"}, None),
    (R.embedding, "cohere", {"model": "cohere/x", "input": "i"}, None),
    (R.speech, "openai", {"model": "openai/x", "input": "i", "voice": "v"}, None),
    (R.transcription, "openai", {"model": "openai/x"}, {"file": ("a.wav", wav_bytes(0.1), "audio/wav")}),
    (R.image_generation, "openai", {"model": "openai/x", "prompt": "p"}, None),
    (R.image_edit, "openai", {"model": "openai/x", "prompt": "p"}, {"image": ("a.png", PNG, "image/png")}),
    (R.image_variation, "openai", {"model": "openai/x"}, {"image": ("a.png", PNG, "image/png")}),
    (R.rerank, "cohere", {"model": "cohere/x", "query": "q", "documents": ["d"]}, None),
    (R.ocr, "mistral", {"model": "mistral/x", "document": {"type": "document_url", "document_url": "u"}}, None),
]


@pytest.mark.parametrize("request_type, provider, body, files", ERROR_CASES,
                         ids=[f"{rt.value}-{p}" for rt, p, *_ in ERROR_CASES])
async def test_provider_error_fails_the_job(stack: Stack, request_type, provider, body, files) -> None:
    fake: FakeProvider = getattr(stack, provider)
    fake.fail_next = [(400, None)]
    job = await run_job(stack, request_type, body, files)
    assert job["status"] == "failed" and job["status_code"] == 400 and "result" not in job
    error = job["error"]
    assert error["is_bifrost_error"] is False and error["status_code"] == 400
    assert error["error"]["message"]  # the provider's own words, read from its error body
    assert error["extra_fields"] == {"provider": provider, "model_requested": "x", "request_type": request_type.value}
    assert PROVIDER_KEY not in str(job)


# -- fallbacks ----------------------------------------------------------------------------------------------------

async def test_fallback_serves_when_the_primary_is_overloaded(stack: Stack) -> None:
    stack.anthropic.fail_next = [(529, None)] * stack.settings.retry_max_attempts
    body = {"model": "anthropic/claude-sonnet-4-5", "fallbacks": ["gemini/gemini-2.0-flash", "openai/gpt-4o-mini"],
            "messages": [{"role": "user", "content": "hello"}]}
    result = completed(await run_job(stack, R.chat_completion, body), "gemini", "gemini-2.0-flash", R.chat_completion)
    assert result["choices"][0]["message"]["content"] == "echo: hello"


async def test_a_4xx_no_fallback_can_fix_ends_the_job(stack: Stack) -> None:
    stack.anthropic.fail_next = [(400, None)]
    calls_before = stack.gemini.calls
    body = {"model": "anthropic/claude-sonnet-4-5", "fallbacks": ["gemini/gemini-2.0-flash"],
            "messages": [{"role": "user", "content": "hello"}]}
    job = await run_job(stack, R.chat_completion, body)
    assert job["status"] == "failed" and job["error"]["extra_fields"]["provider"] == "anthropic"
    assert job["error"]["error"]["type"] == "invalid_request_error"
    assert stack.gemini.calls == calls_before
