"""The worker's consumer: records reach the streams directly, and by Faust's way when a stream's
buffer is full (so that a rebalance can still interrupt the wait); it runs on the worker's own loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from mode.threads import WorkerThread

from app.settings import Settings
from tests.helpers import poll_until_done, submit, worker_running
from workers.faust_layer import FerryConsumer


@pytest.mark.timeout(300)
async def test_records_reach_a_stream_whose_buffer_is_full(api, ferry_settings: Settings) -> None:
    one_at_a_time = ferry_settings.model_copy(update={"worker_max_in_flight": 1})
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "x_fake": {"latency": 0.05}}
    # The request agent waits for the single slot, so the stream's buffer of 4 fills up.
    async with worker_running(one_at_a_time, stream_buffer_maxsize=4) as worker:
        consumer = worker.app.consumer
        assert isinstance(consumer, FerryConsumer)
        waited = []
        cannot_block = consumer._delivery_cannot_block

        def counting_cannot_block(tp):
            direct = cannot_block(tp)
            if not direct:
                waited.append(tp)
            return direct

        consumer._delivery_cannot_block = counting_cannot_block
        ids = [(await submit(api, body))["id"] for _ in range(30)]
        finished = [await poll_until_done(api, job_id, timeout=120) for job_id in ids]
    assert [job["status"] for job in finished] == ["completed"] * 30
    assert waited, "a full buffer made the consumer fall back to Faust's interruptible wait"


@pytest.mark.timeout(300)
async def test_the_consumer_runs_on_the_workers_loop_and_stops_with_it(api, ferry_settings: Settings) -> None:
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with worker_running(ferry_settings) as worker:
        kafka_consumer = worker.app.consumer._thread._ensure_consumer()
        threads = [thread for thread in threading.enumerate() if isinstance(thread, WorkerThread)]
        assert threads == [], "Faust's consumer thread is not started"
        assert kafka_consumer._fetcher._fetch_task.get_loop() is asyncio.get_running_loop()
        finished = await poll_until_done(api, (await submit(api, body))["id"], timeout=120)
    assert finished["status"] == "completed"
    assert kafka_consumer._closed, "the Kafka consumer stopped with the worker"
    assert kafka_consumer._coordinator._closing.done(), "and left its group"
