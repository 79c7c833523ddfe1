"""The API's view of the jobs table: stopping it while Kafka is away, and records it cannot read."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka.consumer.fetcher import Fetcher

from api.read_model import JobReadModel
from app.fetcher import WatchedFetcher
from app.jobs import JobState, JobStatus, RequestType
from app.settings import Settings
from app.topics import changelog_topic, declare_topics
from tests.helpers import wait_until
from tests.workers.faust_repro import produce


@pytest.mark.timeout(180)
async def test_the_view_stops_cleanly_while_the_broker_is_away(private_broker, settings: Settings) -> None:
    """aiokafka's fetcher, stopped while it waits to retry a failed fetch, raised the
    cancellation of that wait out of ``consumer.stop()``: the API's shutdown then failed."""
    await asyncio.to_thread(private_broker.start)
    own = settings.model_copy(update={"kafka_bootstrap_servers": private_broker.bootstrap_servers})
    await declare_topics(own)
    view = JobReadModel(own)
    await view.start()
    try:
        await wait_until(lambda: view.caught_up, 60, "the view to catch up")
        await asyncio.to_thread(private_broker.kill)
        await asyncio.sleep(1.5)  # failed fetches, each followed by a retry wait, meanwhile
        assert not await view.ready()
    finally:
        await view.stop()  # must not raise
        await view.stop()  # and is harmless twice


@pytest.mark.timeout(180)
async def test_a_changelog_record_that_is_no_job_state_is_skipped(settings: Settings) -> None:
    """A record the view cannot read (not JSON, no status, an unknown status, not an object) ended the
    view's consumer task: every later record went unread while the API still answered ready."""
    await declare_topics(settings)
    topic, partition = changelog_topic(settings), 0
    valid = [JobState(id=f"job-{n}", request_type=RequestType.chat_completion, status=JobStatus.pending,
                      created_at=datetime.now(UTC), ttl_seconds=3600) for n in range(2)]
    bootstrap = settings.require_bootstrap_servers()
    view = JobReadModel(settings)
    await view.start()
    try:
        await wait_until(lambda: view.caught_up, 60, "the view to catch up")
        await produce(bootstrap, topic, {partition: [
            (valid[0].id.encode(), valid[0].to_bytes()),
            (b"not-json", b"\xff{"), (b"no-status", b"{}"), (b"odd-status", b'{"status": "odd"}'),
            (b"a-list", b"[1, 2]"), (b"half", b'{"status": "completed"}'),
            (valid[1].id.encode(), valid[1].to_bytes()),
        ]})
        await wait_until(lambda: view.get(valid[1].id) is not None, 30, "the record after the unreadable ones")
        assert view.get(valid[0].id) == valid[0]
        assert [view.get(key) for key in ("not-json", "no-status", "odd-status", "a-list", "half")] == [None] * 5
        assert await view.ready()
    finally:
        await view.stop()


@pytest.mark.timeout(180)
async def test_the_view_stops_when_stopped_while_it_replaces_its_first_fetcher(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's ``Fetcher.close()`` awaits the fetch task inside ``suppress(CancelledError)``: the
    view, stopped while it closed the fetcher its consumer started with (to put its own in place),
    lost the cancellation, ran on, and ``stop()`` waited for it for ever. The fetch task here takes
    a second to end, as one does that is mid-request; aiokafka's own ``close()`` runs unchanged."""
    await declare_topics(settings)
    closing = asyncio.Event()
    plain_close = Fetcher.close

    async def ending_slowly() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            closing.set()
            await asyncio.sleep(1)  # close() awaits this: the view's stop comes meanwhile

    async def close(fetcher: Fetcher) -> None:
        if not isinstance(fetcher, WatchedFetcher):  # the consumer's own, being replaced
            fetcher._fetch_task.cancel()
            fetcher._fetch_task = asyncio.create_task(ending_slowly())
            await asyncio.sleep(0)  # started
        await plain_close(fetcher)

    monkeypatch.setattr(Fetcher, "close", close)
    view = JobReadModel(settings)
    await view.start()
    await asyncio.wait_for(closing.wait(), 60)
    await asyncio.wait_for(view.stop(), 30)
    assert not view.caught_up
