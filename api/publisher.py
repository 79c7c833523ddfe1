"""Durable submit: a job is in Kafka, acknowledged by all in-sync replicas, before its 202.

Two writes, in this order, to the job's partition (``app.topics.partition_for``):

1. a ``pending`` ``JobState`` to the jobs table's changelog, so every API replica's view knows
   the job at once, even while it waits behind a backlog no worker has reached;
2. the ``JobRequest`` to its request topic, which the workers consume.

The order matters: the worker's first write for the job (``processing``) goes to the same
changelog partition and can only happen after it has read the request, so it always lands
after the ``pending`` record and a compacted changelog never ends on a stale ``pending``.
Both writes must be acknowledged within ``submit_timeout_seconds``, or the submit fails with
503 and the client may retry.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from app.jobs import JobRequest, JobState
from app.settings import Settings
from app.topics import changelog_topic, max_message_bytes, partition_for, request_topic

log = logging.getLogger(__name__)


class PublishUnavailable(Exception):
    """Kafka did not take the job in time; nothing the client should count on was stored."""


class JobPublisher:
    """Owns the API's idempotent, acks=all producer; started and stopped once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._connect_task: asyncio.Task | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._settings.require_bootstrap_servers(),
            client_id="ferry-api",
            acks="all",
            enable_idempotence=True,
            linger_ms=1,  # a millisecond of batching buys far more throughput than it costs
            max_batch_size=256 * 1024,
            max_request_size=max_message_bytes(self._settings),
            request_timeout_ms=10_000,
        )

    async def start(self) -> None:
        """Connect in the background: the API serves (503 for submits) until Kafka answers."""
        self._connect_task = asyncio.create_task(self._connect(), name="kafka-producer-connect")

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            producer = self._new_producer()
            try:
                await producer.start()
            except KafkaError as exc:
                log.warning("Kafka producer cannot connect yet (%s); retrying in %.1f s", type(exc).__name__, delay)
                await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._producer = producer
            self._connected.set()
            return

    async def stop(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
            self._connect_task = None
        if self._producer is not None:
            producer, self._producer = self._producer, None
            self._connected.clear()
            await producer.stop()

    async def publish(self, request: JobRequest) -> None:
        """Store the job durably, or raise ``PublishUnavailable`` within the submit timeout."""
        producer = self._producer
        if producer is None:
            raise PublishUnavailable("not connected to Kafka")
        key = request.id.encode()
        partition = partition_for(request.id, self._settings.topic_partitions)
        pending_sent = False
        try:
            async with asyncio.timeout(self._settings.submit_timeout_seconds):
                await (await producer.send(changelog_topic(self._settings), JobState.pending(request).to_bytes(),
                                           key=key, partition=partition))
                pending_sent = True
                await (await producer.send(request_topic(self._settings, request.request_type),
                                           request.to_bytes(), key=key, partition=partition))
        except (TimeoutError, KafkaError) as exc:
            if pending_sent:
                self._forget_pending(producer, key, partition)
            raise PublishUnavailable(type(exc).__name__) from exc

    def _forget_pending(self, producer: AIOKafkaProducer, key: bytes, partition: int) -> None:
        """Best effort: tombstone the pending record of a job whose request was not stored.

        If the request was stored after all (its ack was merely late), the worker's own writes
        follow this tombstone and the job simply runs, unpolled, until it expires.
        """
        async def send_tombstone() -> None:
            try:
                await producer.send(changelog_topic(self._settings), None, key=key, partition=partition)
            except KafkaError:
                log.warning("could not tombstone the pending record of a refused submit")

        asyncio.create_task(send_tombstone())
