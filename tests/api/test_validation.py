"""Submit validation and the TTL header rules, without a broker."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.validation import result_ttl_seconds, validate_json_submit
from app.jobs import RequestType, Target
from app.settings import Settings

ENDPOINTS = Settings(providers={"openai": {"api_key": "sk-x"}, "corp": {"base_url": "http://corp/v1"}}).provider_endpoints


@pytest.mark.parametrize("header, expected", [
    (None, 3600), ("", 3600), ("abc", 3600), ("-5", 3600), ("0", 3600), ("120", 120), (" 60 ", 60),
    ("999999999", 86400),
])
def test_result_ttl(header, expected) -> None:
    assert result_ttl_seconds(header, default=3600, maximum=86400) == expected


def test_model_split_on_first_slash_and_fallbacks_kept_in_order() -> None:
    raw = b'{"model": "corp/meta-llama/llama-3", "fallbacks": ["openai/gpt-4o"], "messages": [{"role": "user"}], "seed": 7}'
    submission = validate_json_submit(raw, RequestType.chat_completion, ENDPOINTS)
    assert submission.targets == [Target(provider="corp", model="meta-llama/llama-3"),
                                  Target(provider="openai", model="gpt-4o")]
    assert submission.body == {"messages": [{"role": "user"}], "seed": 7}


def test_stream_false_is_accepted() -> None:
    raw = b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "stream": false}'
    assert validate_json_submit(raw, RequestType.chat_completion, ENDPOINTS).body["stream"] is False


def test_unconfigured_known_provider() -> None:
    with pytest.raises(ApiError) as refused:
        validate_json_submit(b'{"model": "vllm/x", "messages": [1]}', RequestType.chat_completion, ENDPOINTS)
    assert refused.value.status == 400 and refused.value.message == "provider vllm is not configured"
