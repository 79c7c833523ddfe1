"""Which body fields each adapter sends on: OpenAI-compatible and Azure targets get the body as
is; the translating adapters (Anthropic, Gemini, Cohere) send what they translate plus the
target API's own fields on their allow-list, and drop the rest (those APIs refuse unknown fields)."""

from __future__ import annotations

from app.jobs import RequestType
from app.providers import ProviderEndpoint
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.azure import AzureAdapter
from workers.providers.cohere import CohereAdapter
from workers.providers.gemini import GeminiAdapter
from workers.providers.openai_compat import OpenAICompatAdapter

R = RequestType
HELLO = [{"role": "user", "content": "hello"}]
# Fields no translating adapter knows: OpenAI-only ones, another provider's, and made-up ones.
FOREIGN = {"n": 2, "logprobs": True, "top_logprobs": 3, "presence_penalty_x": 1, "stream_options": {"a": 1},
           "reasoning_effort": "low", "some_future_field": {"kept": [1, 2]}, "x_fake": {"status": 429}}


def endpoint(family: str) -> ProviderEndpoint:
    return ProviderEndpoint(name=family, family=family, base_url="http://h", api_key="sk-secret",
                            timeout_seconds=5, request_types=frozenset(R))


def test_openai_compatible_and_azure_targets_get_every_field() -> None:
    body = {"messages": HELLO, "temperature": 0.1, **FOREIGN, "top_k": 5, "safetySettings": []}
    for adapter in (OpenAICompatAdapter(), AzureAdapter()):
        sent = adapter.build_request(endpoint("openai"), R.chat_completion, "m", body).json
        assert {key: value for key, value in sent.items() if key != "model"} == body


def test_anthropic_passes_its_own_fields_and_drops_the_rest() -> None:
    native = {"top_k": 40, "thinking": {"type": "enabled", "budget_tokens": 2048},
              "metadata": {"user_id": "u-1"}, "service_tier": "auto", "container": "c-1",
              "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]}
    body = {"messages": HELLO, "max_tokens": 100, "temperature": 0.3, "top_p": 0.9, "stop": "END",
            "seed": 7, "response_format": {"type": "json_object"}, "frequency_penalty": 0.5,
            "safetySettings": [], "cachedContent": "c", "max_tokens_per_doc": 9, **FOREIGN, **native}
    sent = AnthropicAdapter().build_request(endpoint("anthropic"), R.chat_completion, "claude", body).json
    assert sent == {"model": "claude", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                    "max_tokens": 100, "temperature": 0.3, "top_p": 0.9, "stop_sequences": ["END"], **native}


def test_gemini_passes_its_own_fields_merges_its_generation_config_and_drops_the_rest() -> None:
    body = {"messages": HELLO, "temperature": 0.3, "max_tokens": 50, "top_k": 40, "thinking": {"type": "enabled"},
            "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
            "cachedContent": "cachedContents/abc",
            "generationConfig": {"topK": 40, "temperature": 0.9, "thinkingConfig": {"thinkingBudget": 0}},
            **FOREIGN}
    sent = GeminiAdapter().build_request(endpoint("gemini"), R.chat_completion, "gemini-2.0-flash", body).json
    assert sent == {
        "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
        # n (FOREIGN's 2) is OpenAI's and translated; the body's own generationConfig wins over the translation
        "generationConfig": {"temperature": 0.9, "maxOutputTokens": 50, "candidateCount": 2, "topK": 40,
                             "thinkingConfig": {"thinkingBudget": 0}},
        "safetySettings": body["safetySettings"], "cachedContent": "cachedContents/abc",
    }


def test_gemini_embeddings_drop_what_they_do_not_translate() -> None:
    body = {"input": ["a", "b"], "dimensions": 16, "task_type": "RETRIEVAL_QUERY", "encoding_format": "float",
            **FOREIGN}
    sent = GeminiAdapter().build_request(endpoint("gemini"), R.embedding, "text-embedding-004", body).json
    item = {"model": "models/text-embedding-004", "outputDimensionality": 16, "taskType": "RETRIEVAL_QUERY"}
    assert sent == {"requests": [{**item, "content": {"parts": [{"text": "a"}]}},
                                 {**item, "content": {"parts": [{"text": "b"}]}}]}


def test_cohere_passes_its_own_fields_and_drops_the_rest() -> None:
    adapter = CohereAdapter()
    rerank = {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True,
              "max_tokens_per_doc": 512, "rank_fields": ["text"], **FOREIGN}
    assert adapter.build_request(endpoint("cohere"), R.rerank, "rerank-v3.5", rerank).json == {
        "model": "rerank-v3.5", "query": "q", "documents": ["a", "b"], "top_n": 1, "max_tokens_per_doc": 512}
    embed = {"input": "a", "dimensions": 256, "input_type": "search_query", "truncate": "END", "max_tokens": 128,
             "encoding_format": "float", "user": "u", **FOREIGN}
    assert adapter.build_request(endpoint("cohere"), R.embedding, "embed-v4.0", embed).json == {
        "model": "embed-v4.0", "texts": ["a"], "embedding_types": ["float"], "input_type": "search_query",
        "output_dimension": 256, "truncate": "END", "max_tokens": 128}
