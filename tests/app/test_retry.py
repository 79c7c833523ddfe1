"""Backoff grows from its first delay to its cap, draws each delay within its jitter, and starts over on reset."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from app.retry import Backoff


@pytest.fixture
def seeded() -> Iterator[None]:
    """Backoff draws from the module-level generator: seed it for the test, then put it back."""
    state = random.getstate()
    random.seed(20261202)
    yield
    random.setstate(state)


def nominal(first: float, cap: float, count: int) -> list[float]:
    """The delays before jitter: first, doubling, held at cap."""
    return [min(first * 2 ** n, cap) for n in range(count)]


def test_without_jitter_the_delays_double_from_first_to_cap_and_stay_there() -> None:
    backoff = Backoff(0.2, 5.0, jitter=1.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0])


def test_a_first_delay_equal_to_the_cap_never_grows() -> None:
    backoff = Backoff(5.0, 5.0, jitter=1.0)
    assert [backoff.next_delay() for _ in range(4)] == [5.0, 5.0, 5.0, 5.0]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.9])
def test_each_delay_lies_between_jitter_times_its_nominal_delay_and_the_nominal_delay(jitter: float) -> None:
    backoff = Backoff(0.1, 3.0, jitter=jitter)
    expected = nominal(0.1, 3.0, 200)
    delays = [backoff.next_delay() for _ in expected]
    for delay, ceiling in zip(delays, expected, strict=True):
        assert jitter * ceiling <= delay <= ceiling
    # Jitter spreads the retries: at the cap, the draws are not all the same.
    assert len({round(delay, 9) for delay in delays[10:]}) > 1


def test_the_jitter_bounds_are_what_the_generator_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[float, float]] = []

    def lowest(low: float, high: float) -> float:
        asked.append((low, high))
        return low

    monkeypatch.setattr("app.retry.random.uniform", lowest)
    backoff = Backoff(0.5, 5.0, jitter=0.25)
    assert [backoff.next_delay() for _ in range(3)] == pytest.approx([0.125, 0.25, 0.5])
    assert asked == [(0.25, 1.0)] * 3


def test_reset_starts_again_from_the_first_delay() -> None:
    backoff = Backoff(0.2, 5.0, jitter=1.0)
    for _ in range(6):
        backoff.next_delay()
    assert backoff.next_delay() == pytest.approx(5.0)
    backoff.reset()
    assert [backoff.next_delay() for _ in range(3)] == pytest.approx([0.2, 0.4, 0.8])


async def test_wait_sleeps_the_delay_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("app.retry.asyncio.sleep", recorded_sleep)
    backoff = Backoff(0.2, 5.0, jitter=0.5)
    waited = [await backoff.wait() for _ in range(4)]
    assert waited == slept
    for delay, ceiling in zip(waited, nominal(0.2, 5.0, 4), strict=True):
        assert 0.5 * ceiling <= delay <= ceiling


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0.0, 1.0, 0.5), (-1.0, 1.0, 0.5), (2.0, 1.0, 0.5),
                                                       (0.1, 1.0, -0.1), (0.1, 1.0, 1.5)])
def test_nonsense_settings_are_refused(first: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap, jitter=jitter)
