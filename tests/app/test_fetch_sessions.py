"""Fetch sessions: the bookkeeping on its own, then a consumer reading a real broker through them."""

from __future__ import annotations

import asyncio
import random
import time
import types

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import FetchSessionIdNotFound, InvalidFetchSessionEpoch, UnknownError

from app.fetch_sessions import (
    INITIAL_EPOCH,
    LAST_EPOCH,
    NO_SESSION,
    FetchSession,
    SessionFetcher,
    SessionFetchRequest,
    use_fetch_sessions,
)
from tests.workers.faust_repro import create_topic, produce

A, B, C = (TopicPartition("t", p) for p in range(3))
PARTITIONS = 16


def test_a_new_session_names_every_partition_then_only_what_changed() -> None:
    session = FetchSession()
    wanted = {A: (0, 100), B: (5, 100)}
    assert session.next_request(wanted) == (NO_SESSION, INITIAL_EPOCH, wanted, [])
    session.answered(wanted, 0, 42)

    moved = {A: (3, 100), B: (5, 100), C: (0, 100)}
    assert session.next_request(moved) == (42, 1, {A: (3, 100), C: (0, 100)}, [])
    session.answered(moved, 0, 42)

    # B has records waiting to be taken, so the consumer leaves it out: the broker must forget it.
    assert session.next_request({A: (3, 100), C: (0, 100)}) == (42, 2, {}, [B])


def test_a_session_error_or_an_unanswered_request_makes_the_next_request_full() -> None:
    wanted = {A: (0, 100), B: (0, 100)}
    session = FetchSession()
    session.answered(wanted, 0, 42)

    session.answered(wanted, InvalidFetchSessionEpoch.errno, 0)
    assert session.next_request(wanted) == (42, INITIAL_EPOCH, wanted, [])  # replaces session 42
    session.answered(wanted, UnknownError.errno, 0)  # and the replacement failed too
    assert session.next_request(wanted) == (NO_SESSION, INITIAL_EPOCH, wanted, [])

    session.answered(wanted, 0, 43)
    session.lost()
    assert session.next_request(wanted) == (43, INITIAL_EPOCH, wanted, [])

    session.answered(wanted, FetchSessionIdNotFound.errno, 0)
    assert session.next_request(wanted) == (NO_SESSION, INITIAL_EPOCH, wanted, [])


def test_a_broker_that_keeps_no_session_gets_full_requests() -> None:
    wanted = {A: (0, 100)}
    session = FetchSession()
    session.answered(wanted, 0, NO_SESSION)
    assert session.next_request(wanted) == (NO_SESSION, INITIAL_EPOCH, wanted, [])


def test_the_epoch_wraps_to_one() -> None:
    session = FetchSession()
    session.answered({}, 0, 42)
    session.epoch = LAST_EPOCH
    session.answered({}, 0, 42)
    assert session.epoch == 1


class _Consumer:
    """A consumer of every partition of one topic, counting the partitions its fetches name."""

    def __init__(self, bootstrap: str, topic: str, sessions: bool) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=50)
        self.partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.sessions = sessions
        self.named: list[int] = []  # partitions named on the wire, per fetch request

    async def __aenter__(self) -> _Consumer:
        await self.consumer.start()
        if self.sessions:
            await use_fetch_sessions(self.consumer)
        client = self.consumer._fetcher._client
        send = client.send

        async def counting_send(node_id, request, **kwargs):
            response = await send(node_id, request, **kwargs)
            if request.API_KEY == 1:  # Fetch; _topics is what went on the wire once built
                self.named.append(sum(len(partitions) for _, partitions in request._topics))
            return response

        client.send = counting_send
        self.consumer.assign(self.partitions)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()

    async def take(self, count: int) -> list[tuple[int, int, bytes]]:
        taken: list[tuple[int, int, bytes]] = []
        try:
            async with asyncio.timeout(30):  # a fetcher whose task failed never answers getmany
                while len(taken) < count:
                    for tp, records in (await self.consumer.getmany(timeout_ms=200)).items():
                        taken += [(tp.partition, r.offset, r.value) for r in records]
        except TimeoutError:
            pytest.fail(f"took {len(taken)} of {count} records in 30 s")
        return taken


def _by_partition(values: list[tuple[int, bytes]]) -> dict[int, list[tuple[None, bytes]]]:
    grouped: dict[int, list[tuple[None, bytes]]] = {}
    for partition, value in values:
        grouped.setdefault(partition, []).append((None, value))
    return grouped


@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "full fetches"])
async def test_once_records_arrive_on_one_partition_fetches_name_only_the_partitions_that_changed(
        kafka_bootstrap: str, unique_id: str, sessions: bool) -> None:
    topic = f"{unique_id}-sessions"
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    async with _Consumer(kafka_bootstrap, topic, sessions) as reader:
        await produce(kafka_bootstrap, topic, {3: [(None, b"warm-up")]})
        assert await reader.take(1) == [(3, 0, b"warm-up")]
        reader.named.clear()

        for value in (f"v{i}".encode() for i in range(20)):  # one at a time: each a fetch of its own
            await produce(kafka_bootstrap, topic, {3: [(None, value)]})
            assert [v for _, _, v in await reader.take(1)] == [value]

    if sessions:
        # Partition 3 leaves the session while its record waits to be taken and comes back with its
        # new offset; the fifteen idle partitions are never named again.
        assert max(reader.named) <= 1, reader.named
    else:
        assert max(reader.named) >= PARTITIONS - 1, reader.named  # what sessions save


async def test_records_arrive_once_each_through_session_errors_and_seeks(kafka_bootstrap: str, unique_id: str) -> None:
    topic = f"{unique_id}-session-faults"
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    async with _Consumer(kafka_bootstrap, topic, sessions=True) as reader:
        fetcher = reader.consumer._fetcher
        first = [(p, f"a{p}-{i}".encode()) for p in range(PARTITIONS) for i in range(3)]
        await produce(kafka_bootstrap, topic, _by_partition(first))
        assert sorted(await reader.take(len(first))) == sorted(
            (p, i, v) for p in range(PARTITIONS) for i, v in enumerate(v for q, v in first if q == p))
        (session,) = fetcher._sessions.values()
        assert session.id != NO_SESSION

        # The broker no longer knows the session's epoch, then its id (as after a broker restart).
        session.epoch += 1000
        second = [(p, f"b{p}".encode()) for p in range(PARTITIONS)]
        await produce(kafka_bootstrap, topic, _by_partition(second))
        assert sorted(await reader.take(len(second))) == sorted((p, 3, v) for p, v in second)

        session.id, session.epoch = session.id + 1, 5  # an id the broker never gave
        third = [(p, f"c{p}".encode()) for p in range(PARTITIONS)]
        await produce(kafka_bootstrap, topic, _by_partition(third))
        assert sorted(await reader.take(len(third))) == sorted((p, 4, v) for p, v in third)

        # An id out of the broker's range: it fails the request (UNKNOWN_SERVER_ERROR), and then
        # the replacement naming it, so the consumer starts a session afresh.
        session.id, session.epoch = 2**31 - 7, 5
        fourth = [(p, f"d{p}".encode()) for p in range(PARTITIONS)]
        await produce(kafka_bootstrap, topic, _by_partition(fourth))
        assert sorted(await reader.take(len(fourth))) == sorted((p, 5, v) for p, v in fourth)

        # A seek back moves a partition's offset: the session must send it, or nothing comes.
        reader.consumer.seek(TopicPartition(topic, 5), 1)
        assert sorted(await reader.take(5)) == [(5, 1, b"a5-1"), (5, 2, b"a5-2"), (5, 3, b"b5"), (5, 4, b"c5"),
                                                (5, 5, b"d5")]

        # Records of partition 7 left untaken while partition 8's are taken: the session forgets
        # 7 (aiokafka fetches no partition whose records wait) and takes it back afterwards.
        seven, eight = TopicPartition(topic, 7), TopicPartition(topic, 8)
        await produce(kafka_bootstrap, topic, {7: [(None, b"e7")], 8: [(None, b"e8")]})
        taken = []
        async with asyncio.timeout(30):
            while len(taken) < 3:
                for records in (await reader.consumer.getmany(eight, timeout_ms=200)).values():
                    taken += [r.value for r in records]
                if taken == [b"e8"]:
                    await produce(kafka_bootstrap, topic, {8: [(None, b"f8"), (None, b"g8")]})
        assert taken == [b"e8", b"f8", b"g8"]
        assert seven not in session.partitions and eight in session.partitions
        assert [r.value for r in (await reader.consumer.getmany(seven, timeout_ms=5000))[seven]] == [b"e7"]
        await produce(kafka_bootstrap, topic, {7: [(None, b"h7")]})
        assert [v for _, _, v in await reader.take(1)] == [b"h7"]

        await asyncio.sleep(0.3)  # idle fetches come back empty
        assert await reader.consumer.getmany(timeout_ms=100) == {}


def test_a_request_that_went_without_a_session_does_not_touch_it() -> None:
    """A broker too old for sessions gets aiokafka's full request, and the session stays new."""
    from aiokafka.protocol.fetch import FetchRequest_v6

    session = FetchSession()
    request = SessionFetchRequest({A: (7, 100), B: (9, 100)}, session, **FETCH_OPTIONS)
    struct = request.build(FetchRequest_v6)
    assert sorted((p[0], p[1]) for _, partitions in struct.topics for p in partitions) == [(0, 7), (1, 9)]
    assert not request.in_session
    assert session.next_request(request.wanted)[1] == INITIAL_EPOCH


FETCH_OPTIONS = {"max_wait_ms": 100, "min_bytes": 1, "max_bytes": 1000, "isolation_level": 0}


class _Buffered:
    """Records a fetcher holds for a partition, not yet taken, whose backoff is ``backoff``."""

    def __init__(self, backoff: float) -> None:
        self.backoff = backoff

    def calculate_backoff(self) -> float:
        return self.backoff


class _Cluster:
    def __init__(self, leaders: dict[TopicPartition, int | None]) -> None:
        self.leaders = leaders

    def leader_for_partition(self, tp: TopicPartition) -> int | None:
        return self.leaders.get(tp)

    def broker_metadata(self, node_id: int) -> object | None:
        return object() if node_id in (1, 2, 3) else None


def _fetcher_in(rng: random.Random, tps: list[TopicPartition]) -> SessionFetcher:
    """A ``SessionFetcher``'s state, drawn at random, without its fetch task (nothing is sent)."""
    fetcher = object.__new__(SessionFetcher)
    fetcher._client = types.SimpleNamespace(cluster=_Cluster(
        {tp: rng.choice([1, 2, 3, 3, 3, None, -1]) for tp in tps}))
    fetcher._records = {tp: _Buffered(rng.choice([0, 0, 0.05, 0.2])) for tp in tps if rng.random() < 0.1}
    fetcher._in_flight = {node for node in (1, 2, 3) if rng.random() < 0.2}
    fetcher._preferred_read_replica = (
        {tp: (rng.choice([1, 2, 9]), time.monotonic() + rng.choice([-1, 60])) for tp in tps if rng.random() < 0.2}
        if rng.random() < 0.5 else {})
    fetcher._max_partition_fetch_bytes = 1048576
    fetcher._fetch_max_wait_ms, fetcher._fetch_min_bytes, fetcher._fetch_max_bytes = 100, 1, 52428800
    fetcher._isolation_level, fetcher._client_rack, fetcher._fetcher_timeout = 0, None, 0.2
    fetcher._sessions = {}
    return fetcher


async def test_each_fetch_round_decides_as_aiokafka_does() -> None:
    """``SessionFetcher`` decides what each partition needs in a pass of its own: over many random
    states (records waiting with or without a backoff, fetches in flight, leaders unknown, preferred
    replicas current or expired, positions to reset, paused partitions), the same fetches, offset
    resets, metadata updates, resume waits and backoff as aiokafka's own pass."""
    from aiokafka.consumer.fetcher import Fetcher
    from aiokafka.consumer.subscription_state import SubscriptionState

    rng = random.Random(20261204)
    tps = [TopicPartition(topic, p) for topic in ("requests-a", "requests-b", "events") for p in range(8)]
    for _ in range(300):
        subscriptions = SubscriptionState()
        subscriptions.assign_from_user(tps)
        assignment = subscriptions.subscription.assignment
        for tp in tps:
            state, draw = assignment.state_value(tp), rng.random()
            if draw < 0.8:
                state.seek(rng.randrange(1000))
                if draw < 0.15:
                    state.pause()
        fetcher = _fetcher_in(rng, tps)
        preferred = dict(fetcher._preferred_read_replica)

        ours = fetcher._get_actions_per_node(assignment)
        fetcher._preferred_read_replica = preferred  # as it was: an expired entry is dropped on reading
        theirs = Fetcher._get_actions_per_node(fetcher, assignment)

        (requests, resets, backoff, invalid, resumes), (plain, plain_resets, plain_backoff, plain_invalid,
                                                        plain_resumes) = ours, theirs
        assert {node: request.wanted for node, request in requests} == {
            node: {TopicPartition(topic, p): (offset, size) for topic, partitions in request.topics
                   for p, offset, size in partitions}
            for node, request in plain}
        assert dict(resets) == dict(plain_resets)
        assert (backoff, invalid) == (plain_backoff, plain_invalid)
        assert resumes == plain_resumes
        for node, request in requests:
            assert request.session is fetcher._sessions[node]
            assert (request._max_wait_ms, request._min_bytes, request._max_bytes) == (100, 1, 52428800)


def test_an_answer_is_read_against_the_partitions_it_lists() -> None:
    """Before its answer a request's ``topics`` lists all it fetches; after it, only those answered
    for, with the offsets fetched (aiokafka checks each answered partition's offset against them)."""
    request = SessionFetchRequest({A: (7, 100), B: (9, 100), C: (3, 100)}, FetchSession(), **FETCH_OPTIONS)
    assert sorted(p for _, partitions in request.topics for p in partitions) == [(0, 7, 100), (1, 9, 100),
                                                                                 (2, 3, 100)]
    answer = types.SimpleNamespace(topics=[("t", [(1, 0, 12, "records")])])
    request.answered_for(answer)
    assert request.topics == [("t", [(1, 9, 100)])]
