"""Reading one job's request again from its request topic, by partition and offset.

Used when a worker resumes a job that another worker had started (it is ``processing`` in the
table, but nobody here runs it): the table keeps where the request sits, not the request.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from app.jobs import JobRequest, RequestLocation
from app.settings import Settings
from app.topics import max_message_bytes


class RequestGone(Exception):
    """The request is no longer in Kafka (retention removed it)."""


class RequestFetcher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.require_bootstrap_servers(),
            client_id="ferry-worker-request-fetcher", group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest",  # a deleted offset then reads as the next one: RequestGone
            max_partition_fetch_bytes=max_message_bytes(self._settings),
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def fetch(self, location: RequestLocation, timeout: float = 10.0) -> JobRequest:
        tp = TopicPartition(location.topic, location.partition)
        async with self._lock:  # one consumer, one position: fetches take turns
            self._consumer.assign([tp])
            self._consumer.seek(tp, location.offset)
            async with asyncio.timeout(timeout):
                while True:
                    records = (await self._consumer.getmany(tp, timeout_ms=1000, max_records=1)).get(tp, [])
                    if records:
                        break
        record = records[0]
        if record.offset != location.offset:
            raise RequestGone(f"offset {location.offset} of {tp} is gone (next is {record.offset})")
        return JobRequest.from_bytes(record.value)
