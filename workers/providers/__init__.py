"""Provider adapters, one module per wire family, looked up by the catalogue's family name."""

from __future__ import annotations

from app.providers import OPENAI_COMPAT
from workers.providers.base import ProviderAdapter
from workers.providers.openai_compat import OpenAICompatAdapter

ADAPTERS: dict[str, ProviderAdapter] = {
    OPENAI_COMPAT: OpenAICompatAdapter(),
}
