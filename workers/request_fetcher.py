"""Reading records again from Kafka by partition and offset: requests, and skipped job events.

Used when a worker resumes a job that another worker had started (it is ``processing`` in the
table, but nobody here runs it: the table keeps where the request sits, not the request), and
when Faust skipped request records that the worker must still take (see ``workers/app.py``).
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app.jobs import JobRequest, RequestLocation
from app.kafka_clients import client_options
from app.settings import Settings


class RequestGone(Exception):
    """The request is no longer in Kafka (retention removed it)."""


class FetcherStopped(Exception):
    """A read after the worker stopped its fetcher (shutdown): the next owner reads instead."""


class RequestFetcher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stopped = False
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        # The worker's start-up and a first rebalance may both get here: one consumer, and
        # nobody uses it before it has started.
        async with self._start_lock:
            if self._stopped:
                raise FetcherStopped()
            if self._consumer is not None:
                return
            consumer = AIOKafkaConsumer(
                **client_options(self._settings),
                client_id="ferry-worker-request-fetcher", group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest",  # a deleted offset then reads as the next one: RequestGone
                # Reads are ranges of a few hundred records: fetch 1 MiB at a time, not the 36 MiB a
                # record may be (Kafka still returns a larger first batch whole, KIP-74).
                max_partition_fetch_bytes=1024 * 1024,
                # An offsets lookup cut off by the worker stopping gives up after this, not 40 s.
                request_timeout_ms=10_000,
            )
            await consumer.start()
            self._consumer = consumer

    async def stop(self) -> None:
        self._stopped = True
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def start_offsets(self, group_id: str, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where ``group_id`` resumes each partition: its committed offset, else the log start."""
        admin = AIOKafkaAdminClient(**client_options(self._settings))
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        finally:
            await admin.close()
        offsets = {tp: meta.offset for tp, meta in committed.items() if meta is not None and meta.offset >= 0}
        missing = [tp for tp in partitions if tp not in offsets]
        if missing:
            async with self._lock:
                await self.start()
                offsets.update(await self._consumer.beginning_offsets(missing))
        return offsets

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        async with self._lock:
            await self.start()
            return await self._consumer.end_offsets(partitions)

    async def fetch(self, location: RequestLocation, timeout: float = 10.0) -> JobRequest:
        """The request at ``location``; RequestGone if retention has removed it."""
        records = await self.fetch_values(location.topic, location.partition, location.offset, location.offset + 1,
                                          timeout)
        if not records:
            raise RequestGone(f"offset {location.offset} of {location.topic}/{location.partition} is gone")
        return JobRequest.from_bytes(records[0][1])

    async def fetch_values(self, topic: str, partition: int, start: int, end: int,
                           timeout: float = 30.0) -> list[tuple[int, bytes]]:
        """``(offset, value)`` of the records in [start, end) of a partition, in one pass.

        Offsets that retention has removed are simply absent (the caller sees which).
        """
        tp = TopicPartition(topic, partition)
        found: list[tuple[int, bytes]] = []
        async with self._lock:  # one consumer, one position: reads take turns
            await self.start()  # a resume may come before the worker's services have started
            consumer = self._consumer  # stop() may clear the attribute under a read: it then fails
            consumer.assign([tp])
            consumer.seek(tp, start)
            async with asyncio.timeout(timeout):
                while True:
                    batch = (await consumer.getmany(tp, timeout_ms=1000, max_records=1000)).get(tp, [])
                    found.extend((record.offset, record.value) for record in batch if record.offset < end)
                    if batch and batch[-1].offset >= end - 1:
                        break
        return found

