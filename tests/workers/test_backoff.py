"""Retry delays: exponential with jitter, never shorter than Retry-After, never over the cap."""

from __future__ import annotations

from app.settings import Settings
from workers.caller import ProviderCaller

caller = ProviderCaller(Settings(retry_initial_backoff_seconds=1.0, retry_max_backoff_seconds=10.0))


def test_backoff_doubles_within_jitter() -> None:
    for failed_calls, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        delays = [caller.backoff_seconds(failed_calls, None) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failed_calls, min(delays), max(delays))


def test_retry_after_is_a_floor_up_to_the_cap() -> None:
    assert all(caller.backoff_seconds(1, 7.0) == 7.0 for _ in range(50))
    assert caller.backoff_seconds(1, 3600.0) == 10.0
