"""The API's view of the jobs table: stopping it while Kafka is away."""

from __future__ import annotations

import asyncio

import pytest

from api.read_model import JobReadModel
from app.settings import Settings
from app.topics import declare_topics
from tests.helpers import wait_until


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
