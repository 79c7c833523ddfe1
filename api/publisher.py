"""Durable submit: a job is in Kafka, acknowledged by all in-sync replicas, before its 202.

Two writes, in this order, to the job's partition (``app.topics.partition_for``):

1. a ``pending`` ``JobState`` to the jobs table's changelog, so every API replica's view knows
   the job at once, even while it waits behind a backlog no worker has reached;
2. the ``JobRequest`` to its request topic, which the workers consume.

The order matters: the worker's first write for the job (``processing``) goes to the same
changelog partition and can only happen after it has read the request, so it always lands
after the ``pending`` record and a compacted changelog never ends on a stale ``pending``.

What a refusal means. The request record is what makes a job run, so each answer follows from
what is known about it:

- ``PublishRefused`` (503): the request record was not handed to the producer within the
  submit's time (``submit_timeout_seconds``), or Kafka refused it. The job will not run. A
  ``pending`` record that may have been written is deleted (a tombstone, sent until Kafka takes
  it, ordered after the record by the idempotent producer).
- ``PublishUncertain`` (503 naming the job): the request record was sent but its produce
  request timed out (a broker that froze, a connection cut after the send), so it may still be
  written. The job keeps its ``pending`` record and its id is returned, so the client can poll
  it instead of submitting twice; if Kafka then refuses the record, the pending record is
  deleted and the poll answers 404.

Once the request record is handed over, the submit waits for the producer's verdict rather
than answering at its deadline: the producer's own timeout is the submit timeout, so the
verdict comes soon after (at most one more produce request's timeout). A submit that outlives
a broker failover (the dead node fenced and a new leader elected in about 3 s with the brokers'
settings in the README) is then a late 202, not a 503 for a job that runs anyway.

A producer whose sender has died (aiokafka's idempotent producer does, with
``OutOfOrderSequenceNumber``, after a batch expired while its partition had no leader) can never
send again: it is replaced, and submits are refused meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Coroutine
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    RequestTimedOutError,
    UnknownProducerId,
)

from app.jobs import JobRequest, JobState
from app.kafka_clients import client_options
from app.retry import Backoff
from app.settings import Settings
from app.tasks import cancel_and_wait
from app.topics import changelog_topic, max_message_bytes, partition_for, request_topic, request_topics

log = logging.getLogger(__name__)

# Errors after which an idempotent producer's sender is gone for good.
FATAL_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, ProducerFenced, InvalidProducerEpoch, UnknownProducerId,
                         ProducerClosed)
# Errors after which a sent record may still be written: its produce request went unanswered
# (timed out, or the connection closed under it). A broker never reached (NodeNotReadyError)
# or one that answered with an error did not take it.
MAYBE_WRITTEN_ERRORS = (RequestTimedOutError, KafkaConnectionError)
# How long a readiness answer is reused: probes come every few seconds per replica.
PROBE_CACHE_SECONDS = 1.0
# How long readiness waits for the brokers' metadata: under the probes' own 3 s timeout.
PROBE_TIMEOUT_SECONDS = 2.0
# How long stopping waits for clean-up writes (tombstones of refused submits) still under way.
STOP_GRACE_SECONDS = 5.0
# Waits between connection attempts and between tombstone resends, in seconds.
RETRY_FIRST_SECONDS = 0.2
RETRY_CAP_SECONDS = 5.0


class PublishRefused(Exception):
    """The job was not queued and will not run."""

    def __init__(self, reason: str, retry_after_seconds: int) -> None:
        super().__init__(reason)
        self.retry_after_seconds = retry_after_seconds


class PublishUncertain(PublishRefused):
    """Kafka did not confirm the request in time; it may still be written and the job run."""

    def __init__(self, job_id: str, reason: str, retry_after_seconds: int) -> None:
        super().__init__(reason, retry_after_seconds)
        self.job_id = job_id


class JobNotStorable(ValueError):
    """The job cannot be serialized into its records (checked before anything is written)."""


class JobPublisher:
    """Owns the API's idempotent, acks=all producer; started and stopped once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._failing_since: float | None = None  # first failure since the last success
        self._probe: tuple[float, bool] = (0.0, False)  # (when, result) of the last readiness probe

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **client_options(self._settings),
            client_id="ferry-api",
            acks="all",
            enable_idempotence=True,
            # No linger: each of a submit's two writes waited a millisecond for company, 2-3 ms of
            # every trip; records sent while a request is in flight still go in one batch.
            linger_ms=0,
            max_batch_size=256 * 1024,
            max_request_size=max_message_bytes(self._settings),
            # A batch is retried (a new leader after a failover) until the submit's time is up,
            # and then fails: the verdict a waiting submit answers with.
            request_timeout_ms=int(self._settings.submit_timeout_seconds * 1000),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background: the API serves (503 for submits) until Kafka answers."""
        self._connect_task = asyncio.create_task(self._connect(), name="kafka-producer-connect")

    async def _connect(self) -> None:
        backoff = Backoff(RETRY_FIRST_SECONDS, RETRY_CAP_SECONDS)
        while True:
            producer = self._new_producer()
            try:
                await producer.start()
            except KafkaError as exc:
                delay = backoff.next_delay()
                log.warning("Kafka producer cannot connect yet (%s); retrying in %.1f s", type(exc).__name__, delay)
                await producer.stop()
                await asyncio.sleep(delay)
                continue
            except asyncio.CancelledError:  # stopped while connecting: close what start() opened
                await _stop_quietly(producer)
                raise
            self._producer = producer
            self._connected.set()
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._background:  # refused submits' tombstones: give them a moment to land
            await asyncio.wait(list(self._background), timeout=STOP_GRACE_SECONDS)
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._connect_task is not None:
            await cancel_and_wait(self._connect_task)
            self._connect_task = None
        if self._producer is not None:
            producer, self._producer = self._producer, None
            self._connected.clear()
            await _stop_quietly(producer)

    def _replace(self, broken: AIOKafkaProducer) -> None:
        """Swap a producer that can never send again for a new one (once, however many notice)."""
        if self._producer is not broken or self._stopping:
            return
        log.error("the Kafka producer failed for good; replacing it (submits are refused meanwhile)")
        self._producer = None
        self._connected.clear()
        self._in_background(_stop_quietly(broken))
        self._connect_task = asyncio.create_task(self._connect(), name="kafka-producer-reconnect")

    # -- health -----------------------------------------------------------------------------------

    def _note_success(self) -> None:
        self._failing_since = None

    def _note_failure(self, producer: AIOKafkaProducer, exc: BaseException | None) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._probe = (0.0, False)  # the next readiness probe looks again
        if isinstance(exc, FATAL_PRODUCER_ERRORS) or _sender_died(producer):
            self._replace(producer)

    def retry_after_seconds(self) -> int:
        """A ``Retry-After`` for a refused submit: about as long as the outage has lasted (1 to
        30 s), jittered so that a fleet of clients does not come back in lockstep."""
        lasted = time.monotonic() - self._failing_since if self._failing_since is not None else 1.0
        return max(1, math.ceil(random.uniform(0.5, 1.5) * min(30.0, max(1.0, lasted))))

    async def ready(self) -> bool:
        """Whether a submit can be published now: a live producer, and a broker that answers
        with a leader for every partition Ferry writes (asked at most once a second)."""
        producer = self._producer
        if producer is None or _sender_died(producer):
            return False
        when, result = self._probe
        if time.monotonic() - when < PROBE_CACHE_SECONDS:
            return result
        result = await self._leaders_known(producer)
        self._probe = (time.monotonic(), result)
        return result

    async def _leaders_known(self, producer: AIOKafkaProducer) -> bool:
        topics = [changelog_topic(self._settings), *request_topics(self._settings)]
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                metadata = await producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError):
            return False
        for topic in topics:
            partitions = metadata.partitions_for_topic(topic) or set()
            if len(partitions) < self._settings.topic_partitions:
                return False
            if any(metadata.leader_for_partition(TopicPartition(topic, p)) in (None, -1) for p in partitions):
                return False
        return True

    # -- publishing -------------------------------------------------------------------------------

    async def publish(self, request: JobRequest) -> bytes:
        """Store the job durably and return its ``pending`` record as written, or raise
        ``PublishRefused`` / ``PublishUncertain`` (see the module docstring), or
        ``JobNotStorable`` before any write."""
        try:
            pending = JobState.pending(request).to_bytes()
            payload = request.to_bytes()
        except (ValueError, RecursionError) as exc:  # pydantic's serialization errors are ValueErrors
            raise JobNotStorable(str(exc).splitlines()[0]) from None
        producer = self._producer
        if producer is None:
            raise PublishRefused("not connected to Kafka", self.retry_after_seconds())
        key = request.id.encode()
        partition = partition_for(request.id, self._settings.topic_partitions)
        deadline = asyncio.get_running_loop().time() + self._settings.submit_timeout_seconds

        pending_ack = await self._hand_over(producer, changelog_topic(self._settings), pending, key, partition,
                                            deadline)
        if pending_ack is None:
            raise PublishRefused("Kafka did not take the job in time", self.retry_after_seconds())
        if await self._acknowledged(producer, pending_ack, deadline) is not True:
            self._in_background(self._forget(request.id, partition))  # it may be written yet
            raise PublishRefused("Kafka did not store the job in time", self.retry_after_seconds())

        request_ack = await self._hand_over(producer, request_topic(self._settings, request.request_type), payload,
                                            key, partition, deadline)
        if request_ack is None:  # never sent
            self._in_background(self._forget(request.id, partition))
            raise PublishRefused("Kafka did not take the job in time", self.retry_after_seconds())
        # The producer gives up on the record a submit timeout after taking it, and a produce
        # request already sent can take one timeout more: the verdict comes by then.
        verdict_by = deadline + 2 * self._settings.submit_timeout_seconds
        acknowledged = await self._acknowledged(producer, request_ack, verdict_by)
        if acknowledged is None and _maybe_written(request_ack):
            raise PublishUncertain(request.id, "Kafka did not confirm the job", self.retry_after_seconds())
        if acknowledged is None:
            self._in_background(self._forget(request.id, partition))
            raise PublishRefused("Kafka did not store the job", self.retry_after_seconds())
        if not acknowledged:
            self._in_background(self._settle(request_ack, request.id, partition))
            raise PublishUncertain(request.id, "Kafka did not confirm the job in time", self.retry_after_seconds())
        self._note_success()
        return pending

    async def _hand_over(self, producer: AIOKafkaProducer, topic: str, value: bytes | None, key: bytes,
                         partition: int, deadline: float) -> asyncio.Future[Any] | None:
        """Give a record to the producer; its acknowledgement future, or None if the producer did
        not take it before ``deadline`` (then it is never sent)."""
        try:
            async with asyncio.timeout_at(deadline):
                ack: asyncio.Future[Any] = await producer.send(topic, value, key=key, partition=partition)
                return ack
        except (TimeoutError, KafkaError) as exc:
            self._note_failure(producer, exc)
            return None

    async def _acknowledged(self, producer: AIOKafkaProducer, ack: asyncio.Future[Any],
                            deadline: float) -> bool | None:
        """True once Kafka acknowledged the record; None if Kafka refused it; False if
        ``deadline`` came first (the record may still be written)."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait([ack], timeout=remaining)  # never cancels the send
        if not done:
            self._note_failure(producer, None)
            return False
        if ack.cancelled() or ack.exception() is not None:
            self._note_failure(producer, None if ack.cancelled() else ack.exception())
            return None
        return True

    async def _settle(self, request_ack: asyncio.Future[Any], job_id: str, partition: int) -> None:
        """After an uncertain answer: if Kafka refuses the request after all, delete the job."""
        try:
            await asyncio.shield(request_ack)
        except MAYBE_WRITTEN_ERRORS:
            pass  # still uncertain: the pending record stays, for the client's poll
        except KafkaError:
            await self._forget(job_id, partition)

    async def _forget(self, job_id: str, partition: int) -> None:
        """Tombstone a refused job's pending record, trying until Kafka takes it (or stop)."""
        backoff = Backoff(RETRY_FIRST_SECONDS, RETRY_CAP_SECONDS)
        while not self._stopping:
            await self._connected.wait()
            producer = self._producer
            if producer is None:
                continue
            try:
                await (await producer.send(changelog_topic(self._settings), None, key=job_id.encode(),
                                           partition=partition))
                return
            except KafkaError as exc:
                self._note_failure(producer, exc)
                await backoff.wait()
        log.warning("stopping before the pending record of refused job %s was deleted", job_id)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _maybe_written(ack: asyncio.Future[Any]) -> bool:
    """Whether a failed send's record may still have been written (see MAYBE_WRITTEN_ERRORS)."""
    return not ack.cancelled() and isinstance(ack.exception(), MAYBE_WRITTEN_ERRORS)


def _sender_died(producer: AIOKafkaProducer) -> bool:
    """Whether the producer's sender task has ended: it never sends again (aiokafka has no
    public flag for it; this reads its one private attribute in one place)."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task is not None and task.done()


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        async with asyncio.timeout(STOP_GRACE_SECONDS):
            await producer.stop()
    except (TimeoutError, KafkaError) as exc:
        log.warning("a Kafka producer did not stop cleanly (%s)", type(exc).__name__)
