"""The API's view of the jobs table: every changelog partition, materialized in memory.

Each API replica consumes the whole compacted changelog (no consumer group, from the start),
applying upserts and tombstones, and answers polls from memory. Why this and not routing the
read to the partition's Faust worker: it survives worker rebalances (no 503 window), needs no
pod-to-pod addressing, scales reads with API replicas, and sees jobs that no worker has read
yet, because the API writes their ``pending`` record to the changelog itself (see
``api/publisher.py``).

Read-your-writes on any replica: a poll for an id this view does not know waits until the view
has consumed its partition up to the end offset taken at the time of the poll (bounded by
``read_wait_seconds``). A 202 is only sent after the pending record was acknowledged, so if the
job exists, that end offset covers it.

States are kept as the raw JSON bytes (parsed on read, the latest few thousand parses kept for
the polls that repeat them), with the status rank beside them so a late ``pending`` never
overwrites a later state.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from app.fetch_sessions import use_fetch_sessions
from app.jobs import JobState, JobStatus
from app.kafka_clients import client_options
from app.retry import Backoff
from app.settings import Settings
from app.tasks import cancel_and_wait
from app.topics import changelog_topic, partition_for

log = logging.getLogger(__name__)

# How long a readiness answer is reused: probes come every few seconds per replica.
PROBE_CACHE_SECONDS = 1.0
# How long a readiness probe waits for Kafka to answer an end-offsets request.
PROBE_TIMEOUT_SECONDS = 1.0
# Waits between connection attempts, in seconds.
RETRY_FIRST_SECONDS = 0.2
RETRY_CAP_SECONDS = 5.0
# How long the broker may hold the view's fetch when nothing is new: an outcome written meanwhile
# ends the hold at once, so this bounds only idle rounds (and what an offset lookup queued behind one waits).
FETCH_MAX_WAIT_MS = 50
# How many parsed states are kept for the polls that follow: a client polls a waiting job every
# few milliseconds, and each poll would otherwise parse the same bytes again (docs/benchmarks.md).
RECENT_STATES = 4096


class ViewUnavailable(Exception):
    """The view could not catch up with Kafka in time: whether the job exists is unknown."""


class JobReadModel:
    """Owns one consumer over the changelog and the in-memory states it feeds."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = changelog_topic(settings)
        self._states: dict[str, tuple[int, bytes]] = {}
        self._recent: dict[str, tuple[bytes, JobState]] = {}  # the latest parses, oldest first
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._progress = asyncio.Event()
        self._initial_end: dict[TopicPartition, int] = {}  # the end offsets when the consumer started
        self.caught_up = False
        self._probe: tuple[float, bool] = (0.0, False)  # (when, result) of the last readiness probe

    def __len__(self) -> int:
        return len(self._states)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobs-read-model")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await self._stop_consumer(consumer)

    @staticmethod
    async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
        try:
            await consumer.stop()
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001
            # aiokafka's fetcher re-raises the cancellation of its own pending fetches (and their
            # errors) from stop() when the broker was away or the consumer failed; the consumer is
            # closed all the same. A cancellation of this task itself still propagates.
            current = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and current is not None and current.cancelling():
                raise
            log.info("the read model's consumer stopped with %s", type(exc).__name__)

    async def _connect(self) -> AIOKafkaConsumer:
        backoff = Backoff(RETRY_FIRST_SECONDS, RETRY_CAP_SECONDS)
        while True:
            consumer = AIOKafkaConsumer(
                **client_options(self._settings),
                client_id="ferry-api-read-model",
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )
            try:
                await consumer.start()
                await use_fetch_sessions(consumer)
                # declare_topics has checked the changelog has exactly this many partitions.
                self._partitions = [TopicPartition(self._topic, p) for p in range(self._settings.topic_partitions)]
                consumer.assign(self._partitions)
                # A replacement resumes where the failed consumer was; the first reads from the start.
                # (seek_to_beginning() with no partition named would reset every one of them.)
                unread = [tp for tp in self._partitions if tp not in self._positions]
                if unread:
                    await consumer.seek_to_beginning(*unread)
                for tp, position in self._positions.items():
                    consumer.seek(tp, position)
                if not self._initial_end:
                    self._initial_end = await consumer.end_offsets(self._partitions)
                return consumer
            except KafkaError as exc:
                delay = backoff.next_delay()
                log.warning("read model cannot reach Kafka yet (%s); retrying in %.1f s", exc, delay)
                await consumer.stop()
                await asyncio.sleep(delay)
            except asyncio.CancelledError:  # stopped while connecting: close what start() opened
                await self._stop_consumer(consumer)
                raise

    async def _run(self) -> None:
        """Consume until stopped. A consumer that fails (its fetch task died, ``getmany`` raised) is
        replaced by a new one resuming at the same offsets: otherwise polls would be answered from
        a view that no longer moves, while readiness still said yes."""
        backoff = Backoff(RETRY_FIRST_SECONDS, RETRY_CAP_SECONDS)
        while True:
            self._consumer = consumer = await self._connect()
            started = time.monotonic()
            try:
                await self._consume(consumer)
            except Exception as exc:  # noqa: BLE001  # whatever it was, this consumer reads no more
                if time.monotonic() - started > RETRY_CAP_SECONDS:
                    backoff.reset()  # it had worked: a failure now is a new one
                delay = backoff.next_delay()
                log.error("the read model's consumer failed (%r); replacing it in %.1f s", exc, delay)
                self._consumer = None  # not ready, and unknown ids are answered 503, until replaced
                await self._stop_consumer(consumer)
                await asyncio.sleep(delay)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for record in records:
                    self._apply_record(record)
            for tp in self._partitions:
                self._positions[tp] = await consumer.position(tp)
            if not self.caught_up and all(self._positions.get(tp, 0) >= end for tp, end in self._initial_end.items()):
                self.caught_up = True
                log.info("read model caught up: %d jobs", len(self._states))
            self._progress.set()
            self._progress = asyncio.Event()

    async def ready(self) -> bool:
        """Whether polls can be answered now: the view has caught up once, and Kafka answers
        its end offsets (so an unknown id can be looked up rather than answered 503)."""
        consumer = self._consumer
        if not self.caught_up or consumer is None:
            return False
        when, result = self._probe
        if time.monotonic() - when < PROBE_CACHE_SECONDS:
            return result
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                await consumer.end_offsets(self._partitions)
            result = True
        except (TimeoutError, KafkaError):
            result = False
        self._probe = (time.monotonic(), result)
        return result

    def remember(self, job_id: str, value: bytes) -> None:
        """Apply a write this process made and Kafka acknowledged, before it comes back around."""
        self._apply(job_id, value)

    def _apply_record(self, record: ConsumerRecord) -> None:
        try:
            self._apply(record.key.decode(), record.value)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Not a job state this version can read (another writer's, or damaged): the rest of the
            # view stays live. The value is not logged: it may hold a job's data.
            log.error("changelog record at %s-%d offset %d is not a job state (%s); skipped",
                      record.topic, record.partition, record.offset, type(exc).__name__)

    def _apply(self, job_id: str, value: bytes | None) -> None:
        if value is None:
            self._states.pop(job_id, None)
            self._recent.pop(job_id, None)
            return
        rank = JobStatus(orjson.loads(value)["status"]).rank
        current = self._states.get(job_id)
        if current is None or rank >= current[0]:
            self._states[job_id] = (rank, value)

    def get(self, job_id: str) -> JobState | None:
        entry = self._states.get(job_id)
        if entry is None:
            return None
        value = entry[1]
        recent = self._recent.get(job_id)
        if recent is not None and recent[0] is value:  # the same record: states are immutable
            return recent[1]
        try:
            state = JobState.from_bytes(value)
        except ValidationError as exc:  # a status, but not a job state: as unknown, not a 500
            log.error("the changelog's record of job %s is not a job state (%d errors)", job_id, exc.error_count())
            return None
        if recent is None and len(self._recent) >= RECENT_STATES:
            del self._recent[next(iter(self._recent))]
        self._recent[job_id] = (value, state)
        return state

    async def lookup(self, job_id: str) -> JobState | None:
        """The job's state; for an id not known yet, first catch up to the partition's end.

        Raises ``ViewUnavailable`` when that catch-up fails (Kafka away): a 404 then could be
        wrong about a job another replica accepted moments ago.
        """
        state = self.get(job_id)
        if state is not None or self._settings.read_wait_seconds == 0:
            return state
        if self._consumer is None:
            raise ViewUnavailable("not connected to Kafka yet")
        tp = TopicPartition(self._topic, partition_for(job_id, self._settings.topic_partitions))
        try:
            async with asyncio.timeout(self._settings.read_wait_seconds):
                end = (await self._consumer.end_offsets([tp]))[tp]
                while self._positions.get(tp, 0) < end:
                    await self._progress.wait()
        except (TimeoutError, KafkaError) as exc:
            state = self.get(job_id)
            if state is None:
                raise ViewUnavailable(type(exc).__name__) from exc
        return self.get(job_id)
