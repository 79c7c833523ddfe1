"""The provider catalogue: which providers Ferry knows, how to reach them, what they serve.

This is data, shared by the API (to refuse a request no configured provider can serve, at
submit) and the workers (to pick the adapter of a provider's wire family). Adding a provider
that speaks an existing wire family is one line here; a new wire family is one adapter module
under ``workers/providers/`` plus its lines here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.jobs import RequestType

# Wire families: each is one adapter module under workers/providers/.
OPENAI_COMPAT = "openai_compat"
AZURE = "azure"
ANTHROPIC = "anthropic"
GEMINI = "gemini"
COHERE = "cohere"
CUSTOM_FAMILY = OPENAI_COMPAT  # a provider configured by name and base URL speaks OpenAI's API

R = RequestType
CHAT = frozenset({R.chat_completion})
# What OpenAI itself serves: everything but rerank and OCR.
OPENAI_TYPES = frozenset(set(R) - {R.rerank, R.ocr})
# What a custom OpenAI-compatible server is assumed to serve unless configured otherwise.
CUSTOM_TYPES = frozenset({R.chat_completion, R.text_completion, R.embedding, R.responses})

@dataclass(frozen=True)
class ProviderSpec:
    """A known provider: its wire family, where it lives by default, and what it serves."""

    name: str
    family: str
    default_base_url: str | None
    api_key_env: str | None
    request_types: frozenset[RequestType]
    needs_key: bool = True


@dataclass(frozen=True)
class ProviderEndpoint:
    """A usable provider: the catalogue's spec with its configuration applied."""

    name: str
    family: str
    base_url: str
    api_key: str | None = field(repr=False)  # never printed, never logged
    timeout_seconds: float
    request_types: frozenset[RequestType]
    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    api_version: str | None = None  # Azure's api-version query parameter


_SPECS = [
    ProviderSpec("openai", OPENAI_COMPAT, "https://api.openai.com/v1", "OPENAI_API_KEY", OPENAI_TYPES),
    # Azure OpenAI: base URL is the resource (https://<name>.openai.azure.com), model the deployment.
    ProviderSpec("azure", AZURE, None, "AZURE_API_KEY", OPENAI_TYPES - {R.image_variation, R.responses}),
    ProviderSpec("anthropic", ANTHROPIC, "https://api.anthropic.com", "ANTHROPIC_API_KEY", CHAT),
    ProviderSpec("gemini", GEMINI, "https://generativelanguage.googleapis.com", "GEMINI_API_KEY",
                 frozenset({R.chat_completion, R.embedding})),
    ProviderSpec("cohere", COHERE, "https://api.cohere.com", "COHERE_API_KEY", frozenset({R.rerank, R.embedding})),
    ProviderSpec("mistral", OPENAI_COMPAT, "https://api.mistral.ai/v1", "MISTRAL_API_KEY",
                 frozenset({R.chat_completion, R.embedding, R.ocr})),
    ProviderSpec("groq", OPENAI_COMPAT, "https://api.groq.com/openai/v1", "GROQ_API_KEY",
                 frozenset({R.chat_completion, R.transcription, R.speech})),
    ProviderSpec("together", OPENAI_COMPAT, "https://api.together.xyz/v1", "TOGETHER_API_KEY",
                 frozenset({R.chat_completion, R.text_completion, R.embedding, R.image_generation, R.rerank})),
    ProviderSpec("fireworks", OPENAI_COMPAT, "https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY",
                 frozenset({R.chat_completion, R.text_completion, R.embedding})),
    ProviderSpec("deepseek", OPENAI_COMPAT, "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", CHAT),
    ProviderSpec("xai", OPENAI_COMPAT, "https://api.x.ai/v1", "XAI_API_KEY",
                 frozenset({R.chat_completion, R.image_generation})),
    ProviderSpec("perplexity", OPENAI_COMPAT, "https://api.perplexity.ai", "PERPLEXITY_API_KEY", CHAT),
    ProviderSpec("cerebras", OPENAI_COMPAT, "https://api.cerebras.ai/v1", "CEREBRAS_API_KEY",
                 frozenset({R.chat_completion, R.text_completion})),
    ProviderSpec("openrouter", OPENAI_COMPAT, "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY",
                 frozenset({R.chat_completion, R.text_completion})),
    # Self-hosted servers: no key needed; vLLM has no default address and must be configured.
    ProviderSpec("ollama", OPENAI_COMPAT, "http://127.0.0.1:11434/v1", None,
                 frozenset({R.chat_completion, R.text_completion, R.embedding}), needs_key=False),
    ProviderSpec("vllm", OPENAI_COMPAT, None, "VLLM_API_KEY",
                 CUSTOM_TYPES | {R.transcription, R.rerank}, needs_key=False),
]

CATALOGUE: dict[str, ProviderSpec] = {spec.name: spec for spec in _SPECS}

# Names the contract reserves for providers whose adapters Ferry does not have yet: a request
# for one gets a precise 400 rather than "unknown provider".
RESERVED_NAMES = frozenset({"vertex", "bedrock"})
