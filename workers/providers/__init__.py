"""Provider adapters, one module per wire family, looked up by the catalogue's family name."""

from __future__ import annotations

from app.providers import ANTHROPIC, AZURE, COHERE, GEMINI, OPENAI_COMPAT
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.azure import AzureAdapter
from workers.providers.base import ProviderAdapter
from workers.providers.cohere import CohereAdapter
from workers.providers.gemini import GeminiAdapter
from workers.providers.openai_compat import OpenAICompatAdapter

ADAPTERS: dict[str, ProviderAdapter] = {
    OPENAI_COMPAT: OpenAICompatAdapter(),
    AZURE: AzureAdapter(),
    ANTHROPIC: AnthropicAdapter(),
    GEMINI: GeminiAdapter(),
    COHERE: CohereAdapter(),
}
