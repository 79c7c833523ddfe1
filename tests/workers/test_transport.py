"""The worker's consumer: records reach the streams directly, and by Faust's way when a stream's
buffer is full (so that a rebalance can still interrupt the wait)."""

from __future__ import annotations

import pytest

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
