"""Per-provider limits inside one worker: calls at once, and call starts per minute.

They keep a worker within what a provider allows, so excess work waits (first in the runner's
bounded slots, then in Kafka) instead of being sent to fail with 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from app.providers import ProviderEndpoint


class StartRate:
    """Spaces call starts evenly: at most ``per_minute`` a minute, no bursts."""

    def __init__(self, per_minute: int) -> None:
        self._interval = 60.0 / per_minute
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait_turn(self) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


class ProviderLimits:
    def __init__(self, endpoint: ProviderEndpoint) -> None:
        self._concurrency = asyncio.Semaphore(endpoint.max_concurrency) if endpoint.max_concurrency else None
        self._rate = StartRate(endpoint.requests_per_minute) if endpoint.requests_per_minute else None

    @contextlib.asynccontextmanager
    async def call_slot(self) -> AsyncIterator[None]:
        async with self._concurrency or contextlib.nullcontext():
            if self._rate is not None:
                await self._rate.wait_turn()
            yield
