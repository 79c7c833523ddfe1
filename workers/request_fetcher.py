"""Reading records again from Kafka by partition and offset: the requests of orphaned jobs.

Used when a worker resumes jobs that another worker had started (``processing`` in the table,
but nobody runs them: the table keeps where each request sits, not the request), and to learn
where the group's commits stand at an assignment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from app.fetcher import fetch_task_died, replace_fetcher
from app.jobs import Outcome, RequestLocation, RequestType
from app.kafka_clients import client_options
from app.retry import Backoff
from app.settings import Settings
from workers.caller import service_error

log = logging.getLogger(__name__)
T = TypeVar("T")

# Reading past this many unwanted records costs more than a seek and a new fetch.
RUN_GAP = 500


def request_gone(request_type: RequestType) -> Outcome:
    """How a job ends whose request retention removed from Kafka before it could be started."""
    error = service_error(500, "the job's request is no longer in Kafka (retention removed it)",
                          "internal_error", None, request_type)
    return Outcome(status_code=500, error=error)


class FetcherStopped(Exception):
    """A read after the worker stopped its fetcher (shutdown): the next owner reads instead."""


def _runs(offsets: list[int], max_skipped: int = RUN_GAP) -> list[tuple[int, int]]:
    """[start, end) ranges covering sorted ``offsets``, split where more than ``max_skipped``
    unwanted records lie between two wanted ones."""
    runs: list[tuple[int, int]] = []
    for offset in offsets:
        if runs and offset - runs[-1][1] <= max_skipped:
            runs[-1] = (runs[-1][0], offset + 1)
        else:
            runs.append((offset, offset + 1))
    return runs


async def retried_while_unreachable(lookup: Callable[..., Awaitable[T]], *args: Any,
                                    stopping: Callable[[], bool]) -> T | None:
    """``lookup(*args)``, retried while Kafka is away or slow (a rebalance must not fail on an
    outage: Faust would give up the assignment); None once ``stopping()``. Other errors raise."""
    backoff = Backoff(0.5, 5.0)
    while not stopping():
        try:
            return await lookup(*args)
        except (KafkaError, TimeoutError) as exc:
            delay = backoff.next_delay()
            log.warning("Kafka read failed (%s); retrying in %.1f s", type(exc).__name__, delay)
            await asyncio.sleep(delay)
    return None


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
                auto_offset_reset="earliest",  # a deleted offset then reads as the next one: absent
                # Reads are ranges of a few hundred records: fetch 1 MiB at a time, not the 36 MiB a
                # record may be (Kafka still returns a larger first batch whole, KIP-74).
                max_partition_fetch_bytes=1024 * 1024,
                # An offsets lookup cut off by the worker stopping gives up after this, not 40 s.
                request_timeout_ms=10_000,
            )
            await consumer.start()
            await replace_fetcher(consumer)  # one whose fetch task's death is raised, not waited out
            self._consumer = consumer

    async def _started(self) -> AIOKafkaConsumer:
        await self.start()
        if self._consumer is not None and (died := fetch_task_died(self._consumer)) is not None:
            # The read that met it failed with it (a KafkaError: retried); the retry gets a new consumer.
            log.error("the request fetcher's consumer stopped fetching (%s); replacing it", died)
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
            await self.start()
        if self._consumer is None:
            raise FetcherStopped()
        return self._consumer

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
                offsets.update(await (await self._started()).beginning_offsets(missing))
        return offsets

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        async with self._lock:
            return await (await self._started()).end_offsets(partitions)

    async def fetch_many(self, locations: list[RequestLocation]) -> dict[RequestLocation, bytes]:
        """The records at ``locations``, read a run of nearby offsets at a time rather than one
        seek per record; a location retention has removed is absent from the result."""
        by_partition: dict[tuple[str, int], list[int]] = {}
        for location in locations:
            by_partition.setdefault((location.topic, location.partition), []).append(location.offset)
        found: dict[RequestLocation, bytes] = {}
        for (topic, partition), offsets in by_partition.items():
            wanted = set(offsets)
            for start, end in _runs(sorted(wanted)):
                for offset, value in await self.fetch_values(topic, partition, start, end):
                    if offset in wanted:
                        found[RequestLocation(topic=topic, partition=partition, offset=offset)] = value
        return found

    async def fetch_values(self, topic: str, partition: int, start: int, end: int,
                           timeout: float = 30.0) -> list[tuple[int, bytes]]:
        """``(offset, value)`` of the records in [start, end) of a partition, in one pass.

        Offsets that retention has removed are simply absent (the caller sees which); a range
        that ends past the partition's last record is read to that record, not waited on.
        """
        tp = TopicPartition(topic, partition)
        found: list[tuple[int, bytes]] = []
        async with self._lock:  # one consumer, one position: reads take turns
            consumer = await self._started()  # a resume may come before the worker's services start
            consumer.assign([tp])
            consumer.seek(tp, start)
            async with asyncio.timeout(timeout):
                while True:
                    batch = (await consumer.getmany(tp, timeout_ms=1000, max_records=1000)).get(tp, [])
                    found.extend((record.offset, record.value) for record in batch if record.offset < end)
                    if batch and batch[-1].offset >= end - 1:
                        break
                    if not batch and await consumer.position(tp) >= (await consumer.end_offsets([tp]))[tp]:
                        break  # read to the end: the rest of the range is not there (retention removed it)
        return found

