"""Waiting between attempts of something that must eventually succeed: exponential, capped, jittered.

Every reconnect or resend loop in the API and the worker waits through one ``Backoff``, so
they all grow the same way and, with jitter, replicas that failed together do not retry in step.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays of ``first``, then doubling up to ``cap``; each drawn from [jitter*delay, delay]."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, *, jitter: float = 0.5) -> None:
        if not 0 < first <= cap:
            raise ValueError("Backoff needs 0 < first <= cap")
        if not 0 <= jitter <= 1:
            raise ValueError("Backoff jitter is a fraction in [0, 1]")
        self.first, self.cap, self.jitter = first, cap, jitter
        self._next = first

    def next_delay(self) -> float:
        """The delay to wait before the next attempt (and grow the one after it)."""
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay * random.uniform(self.jitter, 1.0)

    async def wait(self) -> float:
        """Sleep the next delay; returns it (for the log line that says how long)."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts again from ``first``."""
        self._next = self.first
