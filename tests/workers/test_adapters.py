"""Provider adapters, unit by unit: request translation out, response and error translation in."""

from __future__ import annotations

import base64

import orjson
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from app.jobs import RequestType, UploadedFile
from app.providers import AZURE, ProviderEndpoint
from workers.providers.anthropic import AnthropicAdapter, to_messages_request
from workers.providers.azure import DEFAULT_API_VERSION, AzureAdapter
from workers.providers.base import HttpResponse, UnsupportedRequest
from workers.providers.cohere import CohereAdapter
from workers.providers.gemini import GeminiAdapter, to_generate_content
from workers.providers.openai_compat import OpenAICompatAdapter

R = RequestType


def endpoint(base_url: str, family: str = "x", **extra) -> ProviderEndpoint:
    return ProviderEndpoint(name=family, family=family, base_url=base_url, api_key="sk-secret", timeout_seconds=5,
                            request_types=frozenset(R), **extra)


def response(status: int, body, headers=None) -> HttpResponse:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return HttpResponse(status, headers or {"content-type": "application/json"}, raw)


TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is in this image? use lookup"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "cat"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    {"role": "user", "content": "thanks"},
]
QUERY_SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look up", "parameters": QUERY_SCHEMA}}]


# -- OpenAI-compatible and Azure ----------------------------------------------------------------------------

def test_openai_multipart_request_keeps_files_and_sets_the_model() -> None:
    upload = UploadedFile(field="file", filename="a.wav", content_type="audio/wav", data=b"RIFF\x00\x01")
    built = OpenAICompatAdapter().build_request(endpoint("http://h/v1"), R.transcription, "whisper-1",
                                                {"language": "en"}, [upload])
    assert built.url == "http://h/v1/audio/transcriptions"
    assert built.json is None and built.data == {"language": "en", "model": "whisper-1"}
    assert built.files == [("file", ("a.wav", b"RIFF\x00\x01", "audio/wav"))]
    assert built.headers["Authorization"] == "Bearer sk-secret"


def test_openai_speech_and_text_transcription_results_are_json() -> None:
    adapter = OpenAICompatAdapter()
    speech = adapter.parse_result(R.speech, response(200, b"\xff\xfbaudio", {"content-type": "audio/mpeg"}),
                                  model="tts-1", body={})
    assert base64.b64decode(speech["audio"]) == b"\xff\xfbaudio" and speech["content_type"] == "audio/mpeg"
    text = adapter.parse_result(R.transcription, response(200, b"hello there", {"content-type": "text/plain"}),
                                model="whisper-1", body={})
    assert text == {"text": "hello there"}


def test_mistral_flat_error_body_is_read() -> None:
    failure = OpenAICompatAdapter().parse_failure(response(422, {"object": "error", "message": "bad document",
                                                                 "type": "invalid_request_error", "param": "document",
                                                                 "code": None}))
    assert (failure.status_code, failure.message, failure.type, failure.param) == \
        (422, "bad document", "invalid_request_error", "document")


def test_azure_deployment_url_api_version_and_key_header() -> None:
    built = AzureAdapter().build_request(endpoint("https://res.openai.azure.com", AZURE), R.chat_completion,
                                         "my gpt", {"messages": []})
    assert built.url == (f"https://res.openai.azure.com/openai/deployments/my%20gpt/chat/completions"
                         f"?api-version={DEFAULT_API_VERSION}")
    assert built.headers["api-key"] == "sk-secret" and "Authorization" not in built.headers
    assert "model" not in built.json
    pinned = AzureAdapter().build_request(endpoint("https://r", AZURE, api_version="2025-01-01-preview"),
                                          R.embedding, "emb", {"input": "x"})
    assert pinned.url.endswith("/embeddings?api-version=2025-01-01-preview")


# -- Anthropic ------------------------------------------------------------------------------------------------

def test_anthropic_request_translation() -> None:
    built = AnthropicAdapter().build_request(
        endpoint("https://api.anthropic.com"), R.chat_completion, "claude-sonnet-4-5",
        {"messages": TOOL_CONVERSATION, "tools": TOOLS, "tool_choice": "required", "stop": "END",
         "max_completion_tokens": 99, "temperature": 0.2, "n": 1, "logprobs": False, "top_k": 5})
    assert built.url == "https://api.anthropic.com/v1/messages"
    assert built.headers["x-api-key"] == "sk-secret" and built.headers["anthropic-version"] == "2023-06-01"
    body = built.json
    assert body["system"] == "Be brief." and body["max_tokens"] == 99 and body["stop_sequences"] == ["END"]
    assert body["temperature"] == 0.2 and body["top_k"] == 5 and "n" not in body and "logprobs" not in body
    assert body["tool_choice"] == {"type": "any"}
    assert body["tools"] == [{"name": "lookup", "description": "Look up",
                              "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    first, assistant, last = body["messages"]
    assert first["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                               "data": "iVBORw0KGgo="}}
    assert assistant["content"] == [{"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"query": "cat"}}]
    # the tool result and the next user text are one user turn
    assert last["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                               {"type": "text", "text": "thanks"}]


def test_anthropic_defaults_max_tokens_and_refuses_what_it_cannot_express() -> None:
    assert to_messages_request("m", {"messages": [{"role": "user", "content": "hi"}]})["max_tokens"] == 4096
    with pytest.raises(UnsupportedRequest):
        to_messages_request("m", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})


def test_anthropic_response_becomes_a_chat_completion() -> None:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
               "content": [{"type": "text", "text": "Checking."},
                           {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"query": "cat"}}],
               "stop_reason": "tool_use", "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2}}
    result = AnthropicAdapter().parse_result(R.chat_completion, response(200, message), model="m", body={})
    completion = ChatCompletion.model_validate(result)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert choice.message.tool_calls[0].function.name == "lookup"
    assert orjson.loads(choice.message.tool_calls[0].function.arguments) == {"query": "cat"}
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 5)
    stopped = dict(message, content=[{"type": "text", "text": "x"}], stop_reason="max_tokens")
    assert AnthropicAdapter().parse_result(R.chat_completion, response(200, stopped), model="m",
                                           body={})["choices"][0]["finish_reason"] == "length"


def test_anthropic_error_bodies() -> None:
    failure = AnthropicAdapter().parse_failure(response(
        529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, {"retry-after": "3"}))
    assert (failure.status_code, failure.type, failure.message, failure.retryable, failure.retry_after_seconds) == \
        (529, "overloaded_error", "Overloaded", True, 3.0)


# -- Gemini ---------------------------------------------------------------------------------------------------

def test_gemini_chat_request_translation() -> None:
    built = GeminiAdapter().build_request(
        endpoint("https://generativelanguage.googleapis.com"), R.chat_completion, "gemini-2.0-flash",
        {"messages": TOOL_CONVERSATION, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 50, "top_p": 0.9,
         "stop": ["X"], "response_format": {"type": "json_object"}})
    assert built.url.endswith("/v1beta/models/gemini-2.0-flash:generateContent")
    assert built.headers["x-goog-api-key"] == "sk-secret"
    body = built.json
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["generationConfig"] == {"topP": 0.9, "maxOutputTokens": 50, "stopSequences": ["X"],
                                        "responseMimeType": "application/json"}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert body["contents"][1]["parts"] == [{"functionCall": {"name": "lookup", "args": {"query": "cat"}}}]
    assert body["contents"][2]["parts"][0] == {"functionResponse": {"name": "lookup", "response": {"content": "a cat"}}}
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert body["tools"][0]["functionDeclarations"][0]["name"] == "lookup"


def test_gemini_tool_message_for_an_unknown_call_is_refused() -> None:
    with pytest.raises(UnsupportedRequest):
        to_generate_content({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]})


def test_gemini_results_and_errors() -> None:
    adapter = GeminiAdapter()
    answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": "hi "}, {"text": "there"}]},
                              "finishReason": "MAX_TOKENS", "index": 0}],
              "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6},
              "modelVersion": "gemini-2.0-flash", "responseId": "r1"}
    completion = ChatCompletion.model_validate(adapter.parse_result(R.chat_completion, response(200, answer),
                                                                    model="gemini-2.0-flash", body={}))
    assert completion.choices[0].message.content == "hi there" and completion.choices[0].finish_reason == "length"
    assert completion.usage.total_tokens == 6
    embedded = adapter.parse_result(R.embedding, response(200, {"embeddings": [{"values": [0.1, 0.2]}]}),
                                    model="text-embedding-004", body={"input": "x"})
    assert embedded["data"][0]["embedding"] == [0.1, 0.2] and embedded["model"] == "text-embedding-004"
    request = adapter.build_request(endpoint("https://g"), R.embedding, "text-embedding-004",
                                    {"input": ["a", "b"], "dimensions": 4})
    assert request.url.endswith(":batchEmbedContents")
    assert request.json["requests"][1] == {"model": "models/text-embedding-004", "content": {"parts": [{"text": "b"}]},
                                           "outputDimensionality": 4}
    failure = adapter.parse_failure(response(429, {"error": {"code": 429, "message": "Resource has been exhausted",
                                                             "status": "RESOURCE_EXHAUSTED"}}))
    assert (failure.type, failure.retryable) == ("RESOURCE_EXHAUSTED", True)


# -- Cohere ---------------------------------------------------------------------------------------------------

def test_cohere_rerank_both_ways() -> None:
    adapter = CohereAdapter()
    body = {"query": "cats", "documents": ["dogs", {"text": "cats purr"}], "top_n": 1, "return_documents": True}
    built = adapter.build_request(endpoint("https://api.cohere.com"), R.rerank, "rerank-v3.5", body)
    assert built.url == "https://api.cohere.com/v2/rerank" and built.headers["Authorization"] == "Bearer sk-secret"
    assert built.json == {"model": "rerank-v3.5", "query": "cats", "documents": ["dogs", "cats purr"], "top_n": 1}
    answer = {"id": "r1", "results": [{"index": 1, "relevance_score": 0.9}],
              "meta": {"billed_units": {"search_units": 1}}}
    result = adapter.parse_result(R.rerank, response(200, answer), model="rerank-v3.5", body=body)
    assert result["results"] == [{"index": 1, "relevance_score": 0.9, "document": {"text": "cats purr"}}]
    assert result["usage"] == {"search_units": 1} and result["model"] == "rerank-v3.5"


def test_cohere_embeddings_both_ways_and_errors() -> None:
    adapter = CohereAdapter()
    built = adapter.build_request(endpoint("https://api.cohere.com"), R.embedding, "embed-v4.0",
                                  {"input": "hello", "dimensions": 256})
    assert built.json == {"model": "embed-v4.0", "texts": ["hello"], "embedding_types": ["float"],
                          "input_type": "search_document", "output_dimension": 256}
    answer = {"id": "e1", "embeddings": {"float": [[0.5, 0.25]]}, "meta": {"billed_units": {"input_tokens": 3}}}
    result = adapter.parse_result(R.embedding, response(200, answer), model="embed-v4.0", body={})
    parsed = CreateEmbeddingResponse.model_validate(result)
    assert parsed.data[0].embedding == [0.5, 0.25] and parsed.usage.prompt_tokens == 3
    failure = adapter.parse_failure(response(429, {"id": "x", "message": "You are using a Trial key"},
                                             {"retry-after": "7"}))
    assert (failure.message, failure.retry_after_seconds, failure.retryable) == ("You are using a Trial key", 7.0, True)
    with pytest.raises(UnsupportedRequest):
        adapter.build_request(endpoint("https://c"), R.chat_completion, "command-r", {"messages": []})
