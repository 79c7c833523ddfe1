"""Per-provider limits inside one worker: calls at once, and call starts per minute.

They keep a worker within what a provider allows, so excess work waits (in Kafka, through the
provider's lane in ``workers/lanes.py``) instead of being sent to fail with 429. A call's place
is a ``Claim``: taken at once if the limits allow (a lane admitting a job), or waited for (a
job's retries and fallbacks), and released when the call ends.
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

    def take_turn_now(self) -> bool:
        """Take the next start if it is due now; False (nothing taken) if it is not."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True

    async def wait_turn(self) -> None:
        # The turn is booked before the first await: callers are served in the order they came.
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


class Claim:
    """A call's place at a provider's limits, taken before the call: its concurrency unit is
    held (its start turn is spent) until the call that uses it ends, or until it is released
    unused. Releasing twice releases once."""

    def __init__(self, limits: ProviderLimits) -> None:
        self.limits = limits
        self._held = True

    def hand_over(self, limits: ProviderLimits) -> bool:
        """Give the place to a call at ``limits``, which releases it when it ends; False if the
        claim is for other limits or already used."""
        if not self._held or limits is not self.limits:
            return False
        self._held = False
        return True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.limits.release()


class ProviderLimits:
    def __init__(self, endpoint: ProviderEndpoint) -> None:
        self._concurrency = asyncio.Semaphore(endpoint.max_concurrency) if endpoint.max_concurrency else None
        self._rate = StartRate(endpoint.requests_per_minute) if endpoint.requests_per_minute else None

    @property
    def limited(self) -> bool:
        return self._concurrency is not None or self._rate is not None

    async def claim_now(self) -> Claim | None:
        """A call's place if the limits allow one now; None, and nothing taken, if not."""
        if self._concurrency is not None and self._concurrency.locked():
            return None
        if self._rate is not None and not self._rate.take_turn_now():
            return None
        if self._concurrency is not None:
            await self._concurrency.acquire()  # not locked: taken without waiting
        return Claim(self)

    async def claim(self) -> Claim:
        """A call's place, once the limits allow one."""
        await self._take_place()
        return Claim(self)

    async def _take_place(self) -> None:
        """Wait for a concurrency unit, then a start turn; the unit is given back if the wait ends early."""
        if self._concurrency is not None:
            await self._concurrency.acquire()
        try:
            if self._rate is not None:
                await self._rate.wait_turn()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._concurrency is not None:
            self._concurrency.release()

    @contextlib.asynccontextmanager
    async def call_slot(self, claim: Claim | None = None) -> AsyncIterator[None]:
        """Hold a place for one call: ``claim``'s if it is one of these limits', else one waited for."""
        if claim is None or not claim.hand_over(self):
            await self._take_place()
        try:
            yield
        finally:
            self.release()
