"""Lanes: a limited provider's jobs wait for its room in Kafka, not in the worker's slots, so a
throttled provider's backlog does not hold up the others; waiting jobs start in order."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from api.routes import READ_MODEL
from app.jobs import JobStatus, RequestType
from app.providers import ProviderEndpoint
from app.settings import Settings
from app.topics import partition_for, request_topic
from deploy.fakes.openai_server import FakeOpenAI
from tests.helpers import (
    PROVIDER_KEY,
    calls_per_marker,
    delete_every_record,
    start_api,
    submit,
    submit_all,
    wait_until,
    with_values,
    worker_running,
)
from workers.limits import ProviderLimits


def limits(max_concurrency: int | None = None, requests_per_minute: int | None = None) -> ProviderLimits:
    return ProviderLimits(ProviderEndpoint("p", "openai_compat", "http://127.0.0.1:1", None, 5.0, frozenset(),
                                           max_concurrency=max_concurrency, requests_per_minute=requests_per_minute))


# -- claims, without Kafka --------------------------------------------------------------------------

async def test_a_claim_now_takes_a_concurrency_unit_only_when_one_is_free() -> None:
    provider = limits(max_concurrency=1)
    first = await provider.claim_now()
    assert first is not None
    assert await provider.claim_now() is None
    first.release()
    first.release()  # once only: the limit stays one call
    second = await provider.claim_now()
    assert second is not None and await provider.claim_now() is None


async def test_a_claim_now_spends_a_start_turn_and_the_next_is_not_due_at_once() -> None:
    provider = limits(requests_per_minute=1)
    assert await provider.claim_now() is not None
    assert await provider.claim_now() is None
    assert limits().limited is False and provider.limited


async def test_a_call_uses_its_claim_and_releases_it_when_it_ends() -> None:
    provider = limits(max_concurrency=1)
    claim = await provider.claim_now()
    assert claim is not None
    # Entered at once with the claim's unit (a second unit would wait forever here).
    async with asyncio.timeout(1):
        async with provider.call_slot(claim):
            assert await provider.claim_now() is None
    claim.release()  # used by the call: nothing more to release
    again = await provider.claim_now()
    assert again is not None and await provider.claim_now() is None


async def test_a_claim_of_other_limits_is_not_used() -> None:
    provider, other = limits(max_concurrency=1), limits(max_concurrency=1)
    claim = await other.claim_now()
    assert claim is not None
    async with provider.call_slot(claim):
        assert await provider.claim_now() is None
    assert await other.claim_now() is None  # still held by the claim
    claim.release()
    assert await other.claim_now() is not None


# -- lanes in a worker, on a real broker -------------------------------------------------------------

@pytest.fixture
async def throttled() -> FakeOpenAI:
    fake = await FakeOpenAI(api_key=PROVIDER_KEY).start()
    yield fake
    await fake.stop()


def two_providers(settings: Settings, fast: FakeOpenAI, throttled: FakeOpenAI, **overrides) -> Settings:
    provider = {"api_key": PROVIDER_KEY, "timeout_seconds": 5}
    values = settings.model_dump(exclude={"providers"}) | {
        "providers": {"openai": {"base_url": fast.base_url, **provider},
                      "throttled": {"base_url": throttled.base_url, **provider, **overrides}},
        "worker_maintenance_interval_seconds": 0.5}
    return Settings(**values)


def chat(marker: str, provider: str = "openai") -> dict:
    return {"model": f"{provider}/gpt-4o-mini", "messages": [{"role": "user", "content": marker}]}


@pytest.mark.timeout(240)
async def test_a_throttled_providers_backlog_leaves_the_slots_to_other_providers(
        settings: Settings, fake_openai: FakeOpenAI, throttled: FakeOpenAI) -> None:
    # One call start a minute, four slots: before lanes the throttled jobs took every slot,
    # waiting a minute for each turn, and the other provider's jobs waited behind them.
    own = with_values(two_providers(settings, fake_openai, throttled, requests_per_minute=1), worker_max_in_flight=4)
    api = await start_api(own)
    try:
        async with worker_running(own) as worker:
            held = await submit_all(api, [chat(f"slow-{i}", "throttled") for i in range(12)], concurrency=1)
            quick = await submit_all(api, [chat(f"fast-{i}") for i in range(12)])
            view = api.server.app[READ_MODEL]
            await wait_until(lambda: all(view.get(i) and view.get(i).status.is_terminal for i in quick), 60,
                             lambda: f"the fast provider's jobs to end: {[view.get(i) for i in quick]}")
            assert {view.get(i).status for i in quick} == {JobStatus.completed}
            assert throttled.calls == 1  # the first turn; the next is a minute away
            assert worker.lanes.waiting() == {"throttled": 11}
            assert worker.counters()["waiting"] == 11
            statuses = [view.get(i).status for i in held]
            assert statuses.count(JobStatus.pending) == 11, statuses
    finally:
        await api.close()


@pytest.mark.timeout(240)
async def test_waiting_jobs_start_one_at_a_time_in_order_at_a_concurrency_of_one(
        settings: Settings, fake_openai: FakeOpenAI, throttled: FakeOpenAI) -> None:
    throttled.latency = 0.05
    peak = 0

    def note_concurrency(_request) -> None:
        nonlocal peak
        peak = max(peak, throttled.in_flight)

    throttled.on_request = note_concurrency
    own = two_providers(settings, fake_openai, throttled, max_concurrency=1)
    api = await start_api(own)
    try:
        async with worker_running(own):
            jobs = 40
            ids = [(await submit(api, chat(f"job-{i}", "throttled")))["id"] for i in range(jobs)]  # in order
            view = api.server.app[READ_MODEL]
            await wait_until(lambda: all(view.get(i) and view.get(i).status.is_terminal for i in ids), 120,
                             "every job to end")
    finally:
        await api.close()
    assert {view.get(i).status for i in ids} == {JobStatus.completed}
    assert set(calls_per_marker(throttled).values()) == {1} and len(calls_per_marker(throttled)) == jobs
    assert peak == 1
    # Within a partition (where Kafka keeps submit order), calls reach the provider in submit order.
    order = [r.body["messages"][-1]["content"] for r in throttled.requests]
    called: dict[int, list[int]] = defaultdict(list)
    for marker in order:
        k = int(marker.removeprefix("job-"))
        called[partition_for(ids[k], own.topic_partitions)].append(k)
    assert all(ks == sorted(ks) for ks in called.values()), dict(called)


async def _five_left_waiting_then_restarted(api, limited: Settings, restarted: Settings, meanwhile=None) -> list[str]:
    """Six jobs for the throttled provider at one call a minute: the first starts, five wait in
    its lane; that worker stops, ``meanwhile()`` runs, and a worker with ``restarted`` takes over
    until every job has ended. The jobs' ids, in submit order."""
    view = api.server.app[READ_MODEL]
    async with worker_running(limited) as worker:
        ids = await submit_all(api, [chat(f"slow-{i}", "throttled") for i in range(6)], concurrency=1)
        await wait_until(lambda: worker.lanes.waiting() == {"throttled": 5}, 60,
                         lambda: f"five jobs to wait: {worker.lanes.waiting()}")
    if meanwhile is not None:
        await meanwhile()
    async with worker_running(restarted):
        await wait_until(lambda: all(view.get(i).status.is_terminal for i in ids), 60,
                         lambda: f"every job to end: {[view.get(i).status for i in ids]}")
    return ids


@pytest.mark.timeout(240)
@pytest.mark.parametrize("now", ["unlimited", "removed"])
async def test_jobs_left_waiting_for_a_provider_no_longer_limited_are_not_stuck(
        settings: Settings, fake_openai: FakeOpenAI, throttled: FakeOpenAI, now: str, tmp_path) -> None:
    # A worker restarted with the provider's limit taken off, or the provider taken out, finds
    # jobs recorded as waiting for it: they start as its slots allow (and, for a provider no
    # longer configured, fail at once as any job for it would), rather than wait for a lane
    # that no longer exists.
    limited = two_providers(settings, fake_openai, throttled, requests_per_minute=1)
    # Another worker (its own files: it rebuilds the lanes from the changelog), as after a move.
    restarted = with_values(two_providers(settings, fake_openai, throttled), worker_data_dir=str(tmp_path / "other"))
    if now == "removed":
        restarted = with_values(restarted, providers={"openai": restarted.providers["openai"].model_dump()})
    api = await start_api(limited)
    view = api.server.app[READ_MODEL]
    try:
        ids = await _five_left_waiting_then_restarted(api, limited, restarted)
    finally:
        await api.close()
    if now == "unlimited":
        assert {view.get(i).status for i in ids} == {JobStatus.completed}
        assert sorted(calls_per_marker(throttled).items()) == [(f"slow-{i}", 1) for i in range(6)]
    else:
        # The one the first worker started (whichever partition it took first) completed there.
        codes = [view.get(i).status_code for i in ids]
        assert sorted(codes) == [200] + [400] * 5
        assert calls_per_marker(throttled) == {f"slow-{codes.index(200)}": 1}
        assert {view.get(i).error.error.message for i in ids if view.get(i).error} == {
            "provider throttled is not configured for chat_completion"}


@pytest.mark.timeout(240)
async def test_a_waiting_job_whose_request_retention_removed_ends_with_an_error(
        settings: Settings, fake_openai: FakeOpenAI, throttled: FakeOpenAI, tmp_path) -> None:
    # Jobs wait in a lane longer than the request topic keeps their requests: when their turn
    # comes they end with the service's error, not wait for a record that no longer exists (in
    # a partition nothing else was written to, the read waited for a record past the end, timed
    # out, and was retried as if Kafka were away, for ever).
    limited = two_providers(settings, fake_openai, throttled, requests_per_minute=1)
    restarted = with_values(two_providers(settings, fake_openai, throttled), worker_data_dir=str(tmp_path / "other"))
    api = await start_api(limited)
    view = api.server.app[READ_MODEL]
    try:
        ids = await _five_left_waiting_then_restarted(api, limited, restarted, meanwhile=lambda: delete_every_record(
            settings, request_topic(settings, RequestType.chat_completion)))
    finally:
        await api.close()
    codes = [view.get(i).status_code for i in ids]
    assert sorted(codes) == [200] + [500] * 5
    assert calls_per_marker(throttled) == {f"slow-{codes.index(200)}": 1}
    assert {view.get(i).error.error.message for i in ids if view.get(i).error} == {
        "the job's request is no longer in Kafka (retention removed it)"}
