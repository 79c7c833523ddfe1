"""Submit validation and the TTL header rules, without a broker."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from api.errors import ApiError
from api.request_models import REQUEST_MODELS
from api.validation import (
    MAX_BODY_DEPTH,
    Form,
    nested_deeper_than,
    result_ttl_seconds,
    validate_form_submit,
    validate_json_submit,
)
from app.jobs import JobRequest, RequestType, Target, UploadedFile, utcnow
from app.settings import Settings

R = RequestType
ENDPOINTS = Settings(providers={"openai": {"api_key": "sk-x"}, "corp": {"base_url": "http://corp/v1"},
                                "cohere": {"api_key": "co-x"}, "mistral": {"api_key": "mi-x"}}).provider_endpoints
MODEL_OF = {R.rerank: "cohere/rerank-v3.5", R.ocr: "mistral/mistral-ocr-latest"}


def refusal(raw: bytes, request_type: RequestType = R.chat_completion, **options) -> str:
    with pytest.raises(ApiError) as refused:
        validate_json_submit(raw, request_type, ENDPOINTS, **options)
    assert refused.value.status == 400
    return refused.value.message


@pytest.mark.parametrize("header, expected", [
    (None, 3600), ("", 3600), ("abc", 3600), ("-5", 3600), ("0", 3600), ("120", 120), (" 60 ", 60),
    ("999999999", 86400),
])
def test_result_ttl(header, expected) -> None:
    assert result_ttl_seconds(header, default=3600, maximum=86400) == expected


def test_model_split_on_first_slash_and_fallbacks_kept_in_order() -> None:
    raw = (b'{"model": "corp/meta-llama/llama-3", "fallbacks": ["openai/gpt-4o"], "messages": [{"role": "user"}], '
           b'"seed": 7}')
    submission = validate_json_submit(raw, RequestType.chat_completion, ENDPOINTS)
    assert submission.targets == [Target(provider="corp", model="meta-llama/llama-3"),
                                  Target(provider="openai", model="gpt-4o")]
    assert submission.body == {"messages": [{"role": "user"}], "seed": 7}


def test_stream_false_is_accepted() -> None:
    raw = b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "stream": false}'
    assert validate_json_submit(raw, RequestType.chat_completion, ENDPOINTS).body["stream"] is False


def test_unconfigured_known_provider() -> None:
    raw = b'{"model": "vllm/x", "messages": [{"role": "user", "content": "hi"}]}'
    assert refusal(raw) == "provider vllm is not configured"


# -- field types --------------------------------------------------------------------------------------------------

TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"cats\"}"}}

# Bodies the OpenAI API takes, with fields Ferry does not type (n, temperature, tools...): all accepted, untouched.
VALID_BODIES = [
    (R.chat_completion, {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "name": "ada", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-1"}}]},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cats purr"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "refusal": None},
        {"role": "user", "content": "", "cache_control": {"type": "ephemeral"}}],
     "n": 2, "temperature": 0.2, "stream": False, "stream_options": None, "fallbacks": None,
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
     "tool_choice": "auto", "logit_bias": {"50256": -100}, "stop": ["\n"], "metadata": {"k": "v"}}),
    (R.chat_completion, {"messages": [{"role": "user", "content": "hi"}], "stream": None}),
    (R.text_completion, {"prompt": "Say hi", "max_tokens": 5, "echo": True, "stream": False}),
    (R.text_completion, {"prompt": ["one", "two"]}),
    (R.text_completion, {"prompt": [1212, 318, 257]}),
    (R.text_completion, {"prompt": [[1212, 318], [257]]}),
    (R.responses, {"input": "hello", "instructions": "brief", "stream": False}),
    (R.responses, {"input": [{"role": "user", "content": "hi"},
                             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                             {"type": "item_reference", "id": "msg_1"},
                             {"type": "function_call_output", "call_id": "call_1", "output": "cats purr"}]}),
    (R.embedding, {"input": "hello", "dimensions": 256, "encoding_format": "float"}),
    (R.embedding, {"input": ["a", "b"]}),
    (R.embedding, {"input": [1, 2, 3]}),
    (R.embedding, {"input": [[1, 2], [3]]}),
    (R.speech, {"input": "hello", "voice": "alloy", "response_format": "mp3", "speed": 1.25, "stream_format": "audio"}),
    (R.speech, {"input": "hello", "voice": {"id": "voice_1234"}, "instructions": "cheerful"}),
    (R.image_generation, {"prompt": "a cat", "n": 2, "size": "1024x1024", "stream": False, "partial_images": 0}),
    (R.rerank, {"query": "cats", "documents": ["dogs bark", {"text": "cats purr"}], "top_n": 1}),
    (R.ocr, {"document": {"type": "document_url", "document_url": "https://example.com/a.pdf"},
             "include_image_base64": True}),
    (R.ocr, {"document": {"type": "image_url", "image_url": "https://example.com/a.png"}}),
]


@pytest.mark.parametrize("request_type, fields", VALID_BODIES,
                         ids=[f"{rt.value}-{i}" for i, (rt, _) in enumerate(VALID_BODIES)])
def test_openai_shaped_bodies_are_accepted_untouched(request_type, fields) -> None:
    body = {"model": MODEL_OF.get(request_type, "openai/some-model"), **fields}
    submission = validate_json_submit(orjson.dumps(body), request_type, ENDPOINTS)
    assert submission.body == {key: value for key, value in body.items() if key not in ("model", "fallbacks")}


WRONG_TYPES = [
    # (request type, fields, the detail after "invalid request format: ")
    (R.chat_completion, {"messages": "hi"}, "messages: Input should be a valid list"),
    (R.chat_completion, {"messages": 42}, "messages: Input should be a valid list"),
    (R.chat_completion, {"messages": {"role": "user", "content": "hi"}}, "messages: Input should be a valid list"),
    (R.chat_completion, {"messages": [1, 2]}, "messages.0: Input should be a valid object"),
    (R.chat_completion, {"messages": [None]}, "messages.0: Input should be a valid object"),
    (R.chat_completion, {"messages": [{"content": "hi"}]}, "messages.0.role: Field required"),
    (R.chat_completion, {"messages": [{"role": 1, "content": "hi"}]},
     "messages.0.role: Input should be a valid string"),
    (R.chat_completion, {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content: expected a string, an array of content parts (objects with a type) or null"),
    (R.chat_completion, {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
     "messages.0.content: expected a string, an array of content parts (objects with a type) or null"),
    (R.chat_completion, {"messages": [{"role": "user", "content": "hi"}], "stream": "true"},
     "stream: Input should be a valid boolean"),
    (R.chat_completion, {"messages": [{"role": "user", "content": "hi"}], "stream": 1},
     "stream: Input should be a valid boolean"),
    (R.text_completion, {"prompt": 5}, "prompt: expected a string, an array of strings, an array of token ids or an "
                                       "array of token id arrays"),
    (R.text_completion, {"prompt": [1, "a"]}, "prompt: expected a string, an array of strings, an array of token ids "
                                              "or an array of token id arrays"),
    (R.text_completion, {"prompt": [True]}, "prompt: expected a string, an array of strings, an array of token ids or "
                                            "an array of token id arrays"),
    (R.responses, {"input": 5}, "input: expected a string or an array of input items (objects)"),
    (R.responses, {"input": ["hi"]}, "input: expected a string or an array of input items (objects)"),
    (R.responses, {"input": "hi", "stream": 0}, "stream: Input should be a valid boolean"),
    (R.embedding, {"input": {"text": "x"}}, "input: expected a string, an array of strings, an array of token ids or "
                                            "an array of token id arrays"),
    (R.embedding, {"input": [1.5]}, "input: expected a string, an array of strings, an array of token ids or an "
                                    "array of token id arrays"),
    (R.speech, {"input": ["a"], "voice": "alloy"}, "input: Input should be a valid string"),
    (R.speech, {"input": "a", "voice": 7}, "voice: expected a string or an object"),
    (R.speech, {"input": "a", "voice": "alloy", "stream_format": True},
     "stream_format: Input should be a valid string"),
    (R.image_generation, {"prompt": ["a cat"]}, "prompt: Input should be a valid string"),
    (R.image_generation, {"prompt": "a cat", "stream": "false"}, "stream: Input should be a valid boolean"),
    (R.rerank, {"query": ["q"], "documents": ["d"]}, "query: Input should be a valid string"),
    (R.rerank, {"query": "q", "documents": "d"}, "documents: Input should be a valid list"),
    (R.rerank, {"query": "q", "documents": [1]}, "documents.0: expected a string or an object"),
    (R.ocr, {"document": "https://example.com/a.pdf"}, "document: Input should be a valid object"),
    # Ferry's own fields, on any type
    (R.embedding, {"model": 5, "input": "x"}, "model: Input should be a valid string"),
    (R.embedding, {"model": {"name": "openai/x"}, "input": "x"}, "model: Input should be a valid string"),
    (R.embedding, {"model": ["openai/x"], "input": "x"}, "model: Input should be a valid string"),
    (R.embedding, {"input": "x", "fallbacks": 5}, "fallbacks: Input should be a valid list"),
    (R.embedding, {"input": "x", "fallbacks": {"openai/x": 1}}, "fallbacks: Input should be a valid list"),
    (R.embedding, {"input": "x", "fallbacks": [1, 2]}, "fallbacks.0: Input should be a valid string"),
    (R.embedding, {"input": "x", "fallbacks": [None]}, "fallbacks.0: Input should be a valid string"),
]


@pytest.mark.parametrize("request_type, fields, detail", WRONG_TYPES,
                         ids=[f"{rt.value}-{i}" for i, (rt, *_) in enumerate(WRONG_TYPES)])
def test_known_field_of_the_wrong_json_type_is_refused(request_type, fields, detail) -> None:
    body = {"model": MODEL_OF.get(request_type, "openai/some-model"), **fields}
    assert refusal(orjson.dumps(body), request_type) == f"invalid request format: {detail}"


def test_the_type_check_comes_before_the_model_and_required_checks() -> None:
    # The contract's order: Bifrost decodes the body first, so a wrong type wins over a missing model.
    assert refusal(b'{"messages": "hi"}') == "invalid request format: messages: Input should be a valid list"
    assert refusal(b'{"model": null, "messages": []}') == "model is required"
    assert refusal(b'{"model": "openai/x", "messages": null}') == "messages is required for chat completion"
    assert refusal(b'{"model": "openai/x", "input": "x", "voice": {}}', R.speech) == \
        "voice is required for speech completion"


def test_every_json_request_type_has_a_model_with_a_json_schema() -> None:
    for request_type, model in REQUEST_MODELS.items():
        schema = model.model_json_schema()
        assert schema["additionalProperties"] is True  # unknown fields pass through
        assert {"model", "fallbacks"} <= set(schema["properties"]), request_type


def test_duplicate_keys_keep_the_last_value_as_bifrost_does() -> None:
    raw = b'{"model": 5, "model": "openai/x", "messages": [{"role": "user", "content": "hi"}], "n": 1, "n": 2}'
    submission = validate_json_submit(raw, R.chat_completion, ENDPOINTS)
    assert submission.targets == [Target(provider="openai", model="x")] and submission.body["n"] == 2


# -- fallbacks -----------------------------------------------------------------------------------------------------

def chat_with_fallbacks(count: int) -> bytes:
    return orjson.dumps({"model": "openai/x", "fallbacks": ["openai/y"] * count,
                         "messages": [{"role": "user", "content": "hi"}]})


def test_fallbacks_are_capped() -> None:
    assert len(validate_json_submit(chat_with_fallbacks(10), R.chat_completion, ENDPOINTS).targets) == 11
    assert refusal(chat_with_fallbacks(11)) == "at most 10 fallbacks are allowed, got 11"
    assert refusal(chat_with_fallbacks(20_000)) == "at most 10 fallbacks are allowed, got 20000"
    assert refusal(chat_with_fallbacks(3), max_fallbacks=2) == "at most 2 fallbacks are allowed, got 3"
    assert len(validate_json_submit(chat_with_fallbacks(0), R.chat_completion, ENDPOINTS, max_fallbacks=0).targets) == 1


def test_form_fallbacks_are_capped_whether_repeated_or_comma_separated() -> None:
    audio = (UploadedFile(field="file", filename="a.wav", content_type="audio/wav", data=b"RIFF"),)
    for given in (["openai/y"] * 11, ",".join(["openai/y"] * 11), ["openai/y,openai/y"] * 6):
        form = Form(fields={"model": "openai/whisper-1", "fallbacks": given}, files=audio)
        with pytest.raises(ApiError) as refused:
            validate_form_submit(form, R.transcription, ENDPOINTS)
        assert refused.value.status == 400
        assert refused.value.message.startswith("at most 10 fallbacks are allowed, got 1")
    form = Form(fields={"model": "openai/whisper-1", "fallbacks": "openai/y,openai/z"}, files=audio)
    assert len(validate_form_submit(form, R.transcription, ENDPOINTS, max_fallbacks=2).targets) == 3


def test_a_huge_model_name_is_not_echoed_whole() -> None:
    message = refusal(orjson.dumps({"model": "x" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]}))
    assert message.startswith("model must be in the form provider/model, got 'xxx") and len(message) < 200
    message = refusal(orjson.dumps({"model": "x" * 1_000_000 + "/m", "messages": [{"role": "user", "content": "hi"}]}))
    assert message.startswith("unknown provider: xxx") and len(message) < 200


# -- nesting depth ----------------------------------------------------------------------------------------------------

def nested_body(depth: int) -> bytes:
    """A chat body nested ``depth`` levels deep, the body object being the first level."""
    extra = b"[" * (depth - 1) + b"1" + b"]" * (depth - 1)
    return b'{"model": "openai/x", "messages": [{"role": "user", "content": "hi"}], "extra": ' + extra + b"}"


def job_for(body: dict) -> JobRequest:
    return JobRequest(id="00000000-0000-4000-8000-000000000000", request_type=R.chat_completion, created_at=utcnow(),
                      ttl_seconds=60, targets=[Target(provider="openai", model="x")], body=body)


def test_nesting_depth_counts_levels() -> None:
    assert not nested_deeper_than({}, 1) and nested_deeper_than({"a": []}, 1)
    assert not nested_deeper_than(orjson.loads(nested_body(5)), 5)
    assert nested_deeper_than(orjson.loads(nested_body(6)), 5)
    assert not nested_deeper_than({"a": [{"b": {}}], "c": "x"}, 4) and nested_deeper_than({"a": [{"b": {"c": []}}]}, 4)


def test_the_deepest_accepted_body_survives_the_job_record_and_one_level_more_is_refused() -> None:
    deepest = validate_json_submit(nested_body(MAX_BODY_DEPTH), R.chat_completion, ENDPOINTS)
    job = job_for(deepest.body)
    assert JobRequest.from_bytes(job.to_bytes()) == job  # what the worker reads back
    for depth in (MAX_BODY_DEPTH + 1, 256, 300, 1_023):
        assert refusal(nested_body(depth)) == f"invalid request format: nested deeper than {MAX_BODY_DEPTH} levels"
    assert refusal(nested_body(10_000)).startswith("invalid request format: ")


def test_the_depth_limit_is_the_job_records_own() -> None:
    # If pydantic's parser ever takes deeper records, the limit can rise; if it takes less, it must fall.
    too_deep = job_for(orjson.loads(nested_body(MAX_BODY_DEPTH + 1)))
    with pytest.raises(ValueError):
        JobRequest.from_bytes(too_deep.to_bytes())


def test_a_token_id_written_with_a_fraction_is_still_a_whole_number() -> None:
    """JSON has one number type (1 and 1.0 are the same value; JSON Schema calls both integers),
    so the fuzzer's 1.0 for a token id is accepted; 1.5 is not a token id."""
    completion = REQUEST_MODELS[RequestType.text_completion]
    assert completion.model_validate({"model": "openai/x", "prompt": [1.0, 2]}).prompt == [1, 2]
    assert REQUEST_MODELS[RequestType.embedding].model_validate({"input": [[1.0], [2]]}).input == [[1], [2]]
    with pytest.raises(ValidationError):
        completion.model_validate({"model": "openai/x", "prompt": [1.5]})
    with pytest.raises(ValidationError):
        completion.model_validate({"model": "openai/x", "prompt": [True]})
