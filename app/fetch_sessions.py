"""Kafka fetch sessions (KIP-227) for aiokafka's consumer: each fetch names only what changed.

aiokafka sends every fetch as a full one: each request names every partition the consumer reads
from that broker, and each answer lists every one of them, records or not. A worker reads 104
partitions (eleven request topics, the job events, the jobs changelog); at a few hundred jobs a
second each job costs about one fetch, much of it spent encoding and decoding partition entries
that said nothing. With sessions the worker's consumer thread uses a fifth to a quarter less CPU
at 200 jobs/s (docs/benchmarks.md, "Fetch sessions, and where a job's CPU goes").

With a session the broker remembers the partitions and their fetch offsets: a request names only
the partitions added or whose offset moved, and those to forget; an answer lists only the
partitions with records, a new high watermark or an error. ``FetchSession`` keeps one broker's
session (pure bookkeeping, no I/O); ``SessionFetcher`` is aiokafka's fetcher (watched for a dead
fetch task, ``app/fetcher.py``) with one session per broker; ``use_fetch_sessions(consumer)`` puts
it into a started consumer.

A request whose answer never came (connection lost, fetch abandoned at a rebalance) leaves the
broker's view unknown, and an answer with a session error says it is lost: the next request
then is a full one that replaces the session, so a partition's fetch offset on the broker is
always the one the consumer last sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import FetchSessionIdNotFound
from aiokafka.protocol.fetch import FetchRequest

from app.fetcher import WatchedFetcher, replace_fetcher

log = logging.getLogger(__name__)

NO_SESSION = 0  # a request's session id when it has none
INITIAL_EPOCH = 0  # a full request that creates a session (replacing the one named, if any)
LAST_EPOCH = 2**31 - 1  # after which epochs start again at 1
FIRST_SESSION_VERSION = 7  # fetch requests carry sessions from this version on

PartitionFetch = tuple[int, int]  # (fetch offset, max bytes) of one partition
T = TypeVar("T")


class FetchSession:
    """One broker's fetch session as this consumer last left it: its id, the epoch of the next
    request, and the partitions the broker holds with the fetch offset and size last sent."""

    def __init__(self) -> None:
        self.id = NO_SESSION
        self.epoch = INITIAL_EPOCH
        self.partitions: dict[TopicPartition, PartitionFetch] = {}

    def next_request(self, wanted: dict[TopicPartition, PartitionFetch]
                     ) -> tuple[int, int, dict[TopicPartition, PartitionFetch], list[TopicPartition]]:
        """(session id, epoch, partitions to name, partitions to forget) for a fetch of ``wanted``."""
        if self.epoch == INITIAL_EPOCH:
            return self.id, INITIAL_EPOCH, wanted, []
        changed = {tp: fetch for tp, fetch in wanted.items() if self.partitions.get(tp) != fetch}
        forgotten = [tp for tp in self.partitions if tp not in wanted]
        return self.id, self.epoch, changed, forgotten

    def answered(self, wanted: dict[TopicPartition, PartitionFetch], error_code: int, session_id: int) -> None:
        """Record the broker's answer to the request for ``wanted`` that ``next_request`` made."""
        if error_code == FetchSessionIdNotFound.errno:
            self.id, self.epoch = NO_SESSION, INITIAL_EPOCH  # gone (broker restarted, evicted)
        elif error_code:
            log.info("fetch session %d: error %d from the broker; the next fetch replaces it", self.id, error_code)
            if self.epoch == INITIAL_EPOCH:
                self.id = NO_SESSION  # replacing it failed too: start afresh
            self.epoch = INITIAL_EPOCH
        elif session_id == NO_SESSION:
            self.id, self.epoch = NO_SESSION, INITIAL_EPOCH  # the broker keeps none: ask again next time
        else:
            self.epoch = 1 if self.epoch == INITIAL_EPOCH or self.epoch == LAST_EPOCH else self.epoch + 1
            self.id = session_id
            self.partitions = dict(wanted)

    def lost(self) -> None:
        """A request went unanswered: whether the broker applied it is unknown, so start over."""
        self.epoch = INITIAL_EPOCH


class SessionFetchRequest(FetchRequest):  # type: ignore[misc]  # aiokafka has no type hints
    """A fetch within a ``FetchSession``. ``topics`` lists every partition fetched (what
    aiokafka checks the answer against); the request on the wire names only what changed."""

    def __init__(self, plain: FetchRequest, session: FetchSession) -> None:
        super().__init__(plain._max_wait_ms, plain._min_bytes, plain._max_bytes, plain._isolation_level,
                         plain.topics, rack_id=plain._rack_id)
        self._all_topics = plain.topics
        self.session = session
        self.wanted: dict[TopicPartition, PartitionFetch] = {
            TopicPartition(topic, partition): (offset, max_bytes)
            for topic, partitions in plain.topics for partition, offset, max_bytes in partitions}
        self.in_session = False  # whether the request went as part of the session (a version that has them)
        self.answered = False

    @property
    def topics(self) -> list[tuple[str, list[tuple[int, int, int]]]]:
        return cast(list[tuple[str, list[tuple[int, int, int]]]], self._all_topics)

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class.API_VERSION < FIRST_SESSION_VERSION:
            return super().build(request_struct_class)  # a full fetch, as aiokafka sends it
        session_id, epoch, named, forgotten = self.session.next_request(self.wanted)
        # What FetchRequest.build encodes: (partition, fetch offset, max bytes) under each topic.
        self._topics = _by_topic((tp, (tp.partition, *fetch)) for tp, fetch in named.items())
        struct = super().build(request_struct_class)
        struct.session_id = session_id
        struct.session_epoch = epoch
        struct.forgotten_topics_data = _by_topic((tp, tp.partition) for tp in forgotten)
        self.in_session = True
        return struct


def _by_topic(entries: Iterable[tuple[TopicPartition, T]]) -> list[tuple[str, list[T]]]:
    """Each partition's entry grouped under its topic, as fetch requests list them."""
    grouped: dict[str, list[T]] = {}
    for tp, entry in entries:
        grouped.setdefault(tp.topic, []).append(entry)
    return list(grouped.items())


class _SessionClient:
    """The consumer's Kafka client, through which each fetch's answer reaches its session."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def send(self, node_id: int, request: Any, **kwargs: Any) -> Any:
        response = await self._client.send(node_id, request, **kwargs)
        if isinstance(request, SessionFetchRequest) and request.in_session:
            request.answered = True
            request.session.answered(request.wanted, response.error_code, response.session_id)
            _drop_unasked(response, request.wanted, request.session)
        return response


def _drop_unasked(response: Any, wanted: dict[TopicPartition, PartitionFetch], session: FetchSession) -> None:
    """Leave out of ``response`` any partition the request did not fetch (aiokafka would fail on
    it), and replace the session that sent it: the broker and the consumer disagree about it."""
    unasked = [(topic, partition) for topic, partitions in response.topics for partition, *_ in partitions
               if TopicPartition(topic, partition) not in wanted]
    if unasked:
        log.warning("fetch session %d answered for partitions it was not asked for (%s); starting a new one",
                    session.id, unasked[:5])
        session.lost()
        response.topics = [(topic, [p for p in partitions if TopicPartition(topic, p[0]) in wanted])
                           for topic, partitions in response.topics]


class SessionFetcher(WatchedFetcher):
    """aiokafka's fetcher (watched, ``app/fetcher.py``), keeping one fetch session per broker."""

    def __init__(self, client: Any, subscriptions: Any, **options: Any) -> None:
        super().__init__(_SessionClient(client), subscriptions, **options)
        self._sessions: dict[int, FetchSession] = {}

    def _get_actions_per_node(self, assignment: Any) -> Any:
        fetch_requests, *rest = super()._get_actions_per_node(assignment)
        in_sessions = [(node_id, SessionFetchRequest(request, self._sessions.setdefault(node_id, FetchSession())))
                       for node_id, request in fetch_requests]
        return (in_sessions, *rest)

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        try:
            return bool(await super()._proc_fetch_request(assignment, node_id, request))
        finally:
            if isinstance(request, SessionFetchRequest) and request.in_session and not request.answered:
                request.session.lost()


async def use_fetch_sessions(consumer: AIOKafkaConsumer) -> None:
    """Give a started consumer a ``SessionFetcher`` in place of the fetcher ``start()`` made."""
    await replace_fetcher(consumer, SessionFetcher)
