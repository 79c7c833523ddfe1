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
fetch task, ``app/fetcher.py``) with one session per broker, which also decides each round's
fetches in a single pass over the partitions (aiokafka's own pass, and taking its result apart
for the session, cost about a millisecond of CPU per round on a worker); ``use_fetch_sessions
(consumer)`` puts it into a started consumer.

A request whose answer never came (connection lost, fetch abandoned at a rebalance) leaves the
broker's view unknown, and an answer with a session error says it is lost: the next request
then is a full one that replaces the session, so a partition's fetch offset on the broker is
always the one the consumer last sent.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, TypeVar

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
    """A fetch of ``wanted`` within a ``FetchSession``: on the wire it names only what changed.

    ``topics`` is what aiokafka reads the answer against: every partition fetched until the answer
    comes, then only those it answered for (``_drop_unasked`` sees it names no other), so reading
    an answer costs what the answer holds, not the hundred partitions a worker fetches."""

    def __init__(self, wanted: dict[TopicPartition, PartitionFetch], session: FetchSession, *, max_wait_ms: int,
                 min_bytes: int, max_bytes: int, isolation_level: int, rack_id: str = "") -> None:
        super().__init__(max_wait_ms, min_bytes, max_bytes, isolation_level, [], rack_id=rack_id)
        self.wanted = wanted
        self.session = session
        self.in_session = False  # whether the request went as part of the session (a version that has them)
        self.answered = False
        self._answered_for: list[tuple[str, list[tuple[int, int, int]]]] | None = None

    @property
    def topics(self) -> list[tuple[str, list[tuple[int, int, int]]]]:
        if self._answered_for is not None:
            return self._answered_for
        return _by_topic((tp, (tp.partition, *fetch)) for tp, fetch in self.wanted.items())

    def answered_for(self, response: Any) -> None:
        """Note the partitions ``response`` (this request's answer, checked by ``_drop_unasked``) lists."""
        self._answered_for = [(topic, [(partition, *self.wanted[TopicPartition(topic, partition)])
                                       for partition, *_ in partitions])
                              for topic, partitions in response.topics]

    def build(self, request_struct_class: Any) -> Any:
        if request_struct_class.API_VERSION < FIRST_SESSION_VERSION:
            self._topics = _shuffled_by_topic(self.wanted)  # a full fetch, as aiokafka sends it
            return super().build(request_struct_class)
        session_id, epoch, named, forgotten = self.session.next_request(self.wanted)
        # What FetchRequest.build encodes: (partition, fetch offset, max bytes) under each topic.
        self._topics = _shuffled_by_topic(named)
        struct = super().build(request_struct_class)
        struct.session_id = session_id
        struct.session_epoch = epoch
        struct.forgotten_topics_data = _by_topic((tp, tp.partition) for tp in forgotten)
        self.in_session = True
        return struct


def _shuffled_by_topic(fetches: dict[TopicPartition, PartitionFetch]) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """The partitions in a random order, as aiokafka sends them: a broker fills an answer in the
    order a full request names them, so no partition is always last when the answer's size limit
    is reached (within a session the broker rotates them itself)."""
    named = list(fetches.items())
    if len(named) > 1:
        random.shuffle(named)
    return _by_topic((tp, (tp.partition, *fetch)) for tp, fetch in named)


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
            request.answered_for(response)
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
        """aiokafka's choice of what each assigned partition needs (a fetch, an offset reset, a
        metadata update, a wait for resume), as aiokafka's own makes it (tested side by side), in
        one pass that builds each node's fetch as its session's ``wanted``. aiokafka's walked the
        partitions, grouped the fetchable ones by topic, and the session took them apart again:
        on a worker's 104 partitions that was most of a fetch round's CPU in the consumer thread
        (docs/benchmarks.md, "The consumer thread's fetch round"), and at modest rates a job costs
        about two rounds."""
        fetchable: dict[int, dict[TopicPartition, PartitionFetch]] = {}
        awaiting_reset: dict[int, list[TopicPartition]] = defaultdict(list)
        backoffs: dict[int, list[float]] = {}
        resume_futures: list[Any] = []
        invalid_metadata = False
        buffered, in_flight, cluster = self._records, self._in_flight, self._client.cluster
        # A preferred read replica (KIP-392) is cached only for a consumer that names its rack.
        node_of = self._select_read_replica if getattr(self, "_preferred_read_replica", None) \
            else cluster.leader_for_partition
        partition_bytes = self._max_partition_fetch_bytes
        for tp in assignment.tps:
            node_id = node_of(tp)
            if tp in buffered:
                # Records not taken yet: that node is fetched from again once they are, or after
                # their backoff, so that a slow reader of one partition does not stall the others.
                backoff = buffered[tp].calculate_backoff()
                if backoff:
                    backoffs.setdefault(node_id, []).append(backoff)
            elif node_id in in_flight:
                continue
            elif node_id is None or node_id == -1:
                invalid_metadata = True
            else:
                state = assignment.state_value(tp)
                if not state.has_valid_position:
                    leader = cluster.leader_for_partition(tp)  # offsets are looked up at the leader only
                    if leader is None or leader == -1:
                        invalid_metadata = True
                    else:
                        awaiting_reset[leader].append(tp)
                elif state.paused:
                    resume_futures.append(state.resume_fut)
                else:
                    fetchable.setdefault(node_id, {})[tp] = (state.position, partition_bytes)
        requests = [
            (node_id, SessionFetchRequest(
                wanted, self._sessions.setdefault(node_id, FetchSession()), max_wait_ms=self._fetch_max_wait_ms,
                min_bytes=self._fetch_min_bytes, max_bytes=self._fetch_max_bytes,
                isolation_level=self._isolation_level, rack_id=self._client_rack or ""))
            for node_id, wanted in fetchable.items() if node_id not in backoffs and node_id not in awaiting_reset]
        # The wait until some node's records are due to be fetched past (the longest of each node's).
        backoff = min(max(node_backoffs) for node_backoffs in backoffs.values()) if backoffs else self._fetcher_timeout
        return requests, awaiting_reset, backoff, invalid_metadata, resume_futures

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        try:
            return bool(await super()._proc_fetch_request(assignment, node_id, request))
        finally:
            if isinstance(request, SessionFetchRequest) and request.in_session and not request.answered:
                request.session.lost()


async def use_fetch_sessions(consumer: AIOKafkaConsumer) -> None:
    """Give a started consumer a ``SessionFetcher`` in place of the fetcher ``start()`` made."""
    await replace_fetcher(consumer, SessionFetcher)
