"""Reproductions of faust-streaming 0.15.3 defects against a real broker, with the classes under test
as parameters, so that the same scenario shows the defect with Faust's classes and its absence with
Ferry's (tests/workers/test_faust_layer.py runs them with ``workers.faust_layer``).

Each ``check_*`` coroutine builds a minimal Faust app, drives one defect's trigger and asserts the
outcome a correct consumer or table gives. Nothing here mocks Kafka: where a scenario needs a
trigger at a precise moment, it changes Faust's own state (the active partition set, the flow) at
the boundary where Faust's rebalance and recovery change it, and the records, positions, seeks and
commits stay the broker's and aiokafka's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Literal

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.offset import OffsetResetStrategy
from faust.contrib.asgi import faust_app_running
from faust.exceptions import ConsistencyError
from faust.sensors import Sensor
from faust.types import TP

from app.settings import Settings
from app.topics import partition_for
from tests.helpers import wait_until
from workers.faust_layer import JobsTable, create_app

STARTUP_TIMEOUT = 90  # a fresh group's first assignment, on a loaded machine


def build_app(settings: Settings, transport_cls: type, table_cls: type = faust.Table, **overrides) -> faust.App:
    """Ferry's Faust app for ``settings``, with ``transport_cls`` as its transport and ``table_cls``
    as the class ``app.Table`` makes (the way the worker installs its own)."""
    app = create_app(settings, web_enabled=False, Table=table_cls, **overrides)
    app.transport = transport_cls(app.conf.broker_consumer, app)
    return app


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: dict[int, list[tuple[bytes | None, bytes]]]) -> None:
    """Write ``records`` (partition -> [(key, value)]) and wait until the broker has them all."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key, partition=partition)
                for partition, pairs in records.items() for key, value in pairs]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic`` (``None``: nothing committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


async def commit_for_group(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit ``offsets`` for ``group`` before any of its members runs."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


def _missing(seen: set[int], upto: int) -> list[int]:
    return sorted(set(range(upto)) - seen)


def _raw_topic(app: faust.App, name: str, partitions: int):
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=partitions)


async def _stream_and_recovered_table(settings: Settings, app: faust.App,
                                      partitions: int) -> tuple[str, faust.TopicT, faust.Table]:
    """A stream topic (its name and Faust topic) and a table whose changelog already holds 20
    records per partition, so that the app's first assignment has a recovery to run."""
    bootstrap = settings.require_bootstrap_servers()
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, partitions)
    table = app.Table("state", partitions=partitions, key_type=bytes, value_type=bytes)
    changelog = table.changelog_topic.get_topic_name()
    await create_topic(bootstrap, name, partitions)
    await create_topic(bootstrap, changelog, partitions)
    await produce(bootstrap, changelog,
                  {p: [(b"key-%d-%d" % (p, n), b"1") for n in range(20)] for p in range(partitions)})
    return name, topic, table


async def _one_partition_stream(settings: Settings, app: faust.App, records: int,
                                after_each=None) -> tuple[str, set[int]]:
    """A one-partition stream topic already holding ``records`` records, and the offsets its agent
    has seen so far (see ``_collecting_agent``)."""
    bootstrap = settings.require_bootstrap_servers()
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, 1)
    await create_topic(bootstrap, name, 1)
    await produce(bootstrap, name, {0: [(None, b"r")] * records})
    return name, _collecting_agent(app, topic, after_each)


def _collecting_agent(app: faust.App, topic, after_each=None) -> set[int]:
    """An agent on ``topic`` that notes each record's offset in the set returned, then awaits
    ``after_each(offset)`` if given."""
    seen: set[int] = set()

    @app.agent(topic)
    async def collect(stream):
        async for event in stream.events():
            seen.add(event.message.offset)
            if after_each is not None:
                await after_each(event.message.offset)

    return seen


# -- 1. Records fetched at assignment are dropped (#216, #221/PR #223) --------------------------------------

async def check_records_fetched_during_recovery_are_delivered(settings: Settings, transport_cls: type,
                                                               per_partition: int = 40) -> None:
    """A fresh group on a new topic (nothing committed) and a table whose changelog holds records, so
    that a fetch is pending when recovery pauses the changelog and empties the active partition set.
    Records written to the stream's partitions while recovery ends (where Ferry's worker walks its
    table) must all reach the agent, and no commit may pass one it did not see."""
    bootstrap, partitions = settings.require_bootstrap_servers(), 4
    app = build_app(settings, transport_cls, broker_commit_interval=3600)
    name, topic, table = await _stream_and_recovered_table(settings, app, partitions)

    seen: dict[int, set[int]] = collections.defaultdict(set)

    @app.agent(topic)
    async def collect(stream):
        async for event in stream.events():
            seen[event.message.partition].add(event.message.offset)

    @table.on_recover
    async def write_while_recovery_ends() -> None:
        # Ferry's worker walks its table here; meanwhile records arrive and the fetch that was
        # pending when recovery paused the changelog hands them over.
        await produce(bootstrap, name, {p: [(None, b"r")] * per_partition for p in range(partitions)})
        fetcher = app.consumer._thread._consumer._fetcher
        held = False
        for _ in range(100):  # until the fetcher held them and handed them over, at most ~1 s
            holds = any(tp.topic == name for tp in fetcher._records)
            if held and not holds:
                break
            held = held or holds
            await asyncio.sleep(0.01)

    async with faust_app_running(app, stop_timeout=60):
        await wait_until(app.tables.recovery.completed.is_set, STARTUP_TIMEOUT, "the table's recovery")
        # One more record per partition: a partition's records arrive in order, so once the agent
        # has seen this one, an earlier record it has not seen is lost.
        await produce(bootstrap, name, {p: [(None, b"marker")] for p in range(partitions)})
        await wait_until(lambda: all(per_partition in seen[p] for p in range(partitions)), 60,
                         lambda: f"the markers (seen so far: { {p: len(s) for p, s in seen.items()} })")
        await app.consumer.commit()
        committed = await committed_offsets(bootstrap, app.conf.id, name)
    missing = {p: _missing(seen[p], per_partition) for p in range(partitions)}
    passed_unseen = {p: committed.get(p) for p in range(partitions)
                     if missing[p] and (committed.get(p) or 0) > missing[p][0]}
    assert (missing, passed_unseen) == ({p: [] for p in range(partitions)}, {}), (
        f"never delivered: {missing}; committed past an undelivered record: {passed_unseen}")


# -- 2. getmany discards fetched records without seeking back (#216, #221/PR #223) -------------------------

async def check_discarded_records_are_fetched_again(settings: Settings, transport_cls: type,
                                                    how: Literal["inactive", "flow_stopped"],
                                                    per_partition: int = 20) -> None:
    """Records aiokafka handed over while their partition was not active (``inactive``), or while
    the flow was stopped (``flow_stopped``), must be fetched again: the partition sought back to the
    first record discarded. The trigger changes Faust's state right after a real fetch returned, as
    recovery's ``pause_partitions`` and a rebalance's ``stop_flow`` do while a fetch is pending."""
    bootstrap, partitions = settings.require_bootstrap_servers(), 2
    app = build_app(settings, transport_cls)
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, partitions)
    await create_topic(bootstrap, name, partitions)
    await produce(bootstrap, name, {p: [(None, b"r")] * per_partition for p in range(partitions)})

    seen: dict[int, set[int]] = collections.defaultdict(set)

    @app.agent(topic)
    async def collect(stream):
        async for event in stream.events():
            seen[event.message.partition].add(event.message.offset)

    consumer = app.consumer
    target = TP(name, 1)
    interrupted = asyncio.Event()
    handed_over: list[int] = []
    fetch = consumer._getmany

    async def fetch_then_interrupt(active_partitions, timeout):
        if interrupted.is_set() and target in consumer._paused_partitions:
            consumer.resume_partitions({target})  # for the next hand-over, as recovery resumes it
        records = await fetch(active_partitions=active_partitions, timeout=timeout)
        if not interrupted.is_set() and records.get(target):
            handed_over.extend(record.offset for record in records[target])
            interrupted.set()
            if how == "inactive":
                consumer.pause_partitions({target})
            else:
                consumer.stop_flow()
        return records

    consumer._getmany = fetch_then_interrupt
    async with faust_app_running(app, stop_timeout=60):
        await wait_until(interrupted.is_set, STARTUP_TIMEOUT, "a fetch holding the target partition's records")
        if how == "flow_stopped":
            consumer.resume_flow()  # getmany has already seen the flow stopped
        await produce(bootstrap, name, {p: [(None, b"marker")] for p in range(partitions)})
        await wait_until(lambda: all(per_partition in seen[p] for p in range(partitions)), 60,
                         lambda: f"the markers (seen so far: { {p: sorted(s) for p, s in seen.items()} })")
    missing = {p: _missing(seen[p], per_partition) for p in range(partitions)}
    assert missing == {p: [] for p in range(partitions)}, (
        f"never delivered: {missing} (offsets {handed_over[0]}-{handed_over[-1]} of partition 1 were "
        f"discarded by getmany, {how})")


# -- 2b. A hand-over under way across a rebalance drops the records before it -------------------------------

async def check_a_hand_over_across_a_rebalance_drops_nothing(settings: Settings, transport_cls: type,
                                                             records: int = 10, target: int = 5) -> None:
    """The hand-over of record ``target`` to its stream is under way while the group rebalances (the
    delivery, or the commit the consumer makes before it, waits across the rebalance, as it does
    while a broker is away). The record reaches the stream with the old generation and the stream
    skips it; meanwhile the rebalance cleared the stream's buffer and sought the partition back.
    Every record must still reach the agent: none may be taken for "read already" because a stale
    hand-over moved the consumer's read offset past it.

    The agent holds the first record until the rebalance is over, so that records 1..target-1 wait
    in the stream's buffer when the rebalance clears it. The rebalance is a real one: the member
    asks the broker's group coordinator to rejoin, which starts a new generation.
    """
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, broker_commit_interval=3600, stream_wait_empty=False)
    rebalanced = asyncio.Event()

    async def hold_the_first(offset: int) -> None:
        if offset == 0:
            await rebalanced.wait()

    name, seen = await _one_partition_stream(settings, app, records, hold_the_first)

    consumer = app.consumer
    on_message = consumer.callback

    async def rejoin() -> None:  # in the consumer's thread, where aiokafka's coordinator lives
        consumer._thread._ensure_consumer()._coordinator.request_rejoin()

    async def hand_over_across_a_rebalance(message) -> None:
        if message.topic == name and message.offset == target and not rebalanced.is_set():
            generation = app.consumer_generation_id
            await consumer._thread.call_thread(rejoin)
            await wait_until(lambda: app.consumer_generation_id != generation and not app.rebalancing, 60,
                             "the rebalance to end")
            rebalanced.set()
        await on_message(message)

    consumer.callback = hand_over_across_a_rebalance
    async with faust_app_running(app, stop_timeout=60):
        await wait_until(rebalanced.is_set, STARTUP_TIMEOUT, "the rebalance during the hand-over")
        await produce(bootstrap, name, {0: [(None, b"marker")]})
        await wait_until(lambda: records in seen, 60, lambda: f"the marker (seen so far: {sorted(seen)})")
    assert _missing(seen, records) == [], f"never delivered: {_missing(seen, records)} (seen {sorted(seen)})"


# -- 2c. Records handed over while recovery ends are cleared by flow_control.resume() -------------------------

async def check_records_handed_over_before_the_flow_resumes_are_kept(settings: Settings, transport_cls: type,
                                                                     records: int = 10) -> None:
    """At the end of a table's recovery Faust resumes the stream partitions, seeks them, and only
    then resumes the app's flow control, which empties every stream's buffer (mode clears its
    queues on resume). Records the consumer handed over in between are dropped, and the consumer
    has moved past them. Every record must still reach the agent.

    The window is held open: the seek at recovery's end returns only once the agent has the
    first record (or after a few seconds, when the consumer hands nothing over before the flow
    resumes), and the agent holds that record until the rebalance is over, so that the others
    wait in its buffer when the flow resumes.
    """
    bootstrap, partitions = settings.require_bootstrap_servers(), 1
    app = build_app(settings, transport_cls, broker_commit_interval=3600, stream_wait_empty=False)
    name, topic, _ = await _stream_and_recovered_table(settings, app, partitions)
    await produce(bootstrap, name, {0: [(None, b"r")] * records})

    async def hold_the_first(offset: int) -> None:
        if offset == 0:
            await wait_until(lambda: not app.rebalancing, 60, "the rebalance to end")

    seen = _collecting_agent(app, topic, hold_the_first)

    consumer = app.consumer
    perform_seek = consumer.perform_seek

    async def seek_then_hold_the_window() -> None:
        await perform_seek()
        if not app.tables.recovery.completed.is_set():  # recovery's end: the flow resumes next
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await wait_until(lambda: 0 in seen, 3, "the first record")

    consumer.perform_seek = seek_then_hold_the_window
    async with faust_app_running(app, stop_timeout=60):
        await wait_until(app.tables.recovery.completed.is_set, STARTUP_TIMEOUT, "the table's recovery")
        await produce(bootstrap, name, {0: [(None, b"marker")]})
        await wait_until(lambda: records in seen, 60, lambda: f"the marker (seen so far: {sorted(seen)})")
    assert _missing(seen, records) == [], f"never delivered: {_missing(seen, records)} (seen {sorted(seen)})"


# -- 2d. With no partition active the fetcher sleeps a whole second, deaf to a resume --------------------------

async def check_an_idle_fetcher_wakes_when_a_partition_is_resumed(settings: Settings, transport_cls: type,
                                                                  records: int = 5) -> None:
    """While no partition is active (recovery reading nothing, or all paused), the fetcher must
    wait for a partition to be resumed, not for a clock: Faust's ``_wait_next_records`` sleeps a
    whole second, and the stream partitions resumed as recovery ends waited it out before their
    first fetch, at every rebalance. The consumer's clock is frozen here (its sleeps never end), so
    a fetcher that waits on the clock never delivers the record written after the resume."""
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls)
    name, seen = await _one_partition_stream(settings, app, records)
    consumer = app.consumer
    wait_next_records = consumer._wait_next_records
    idle = asyncio.Event()

    async def frozen_clock(seconds: float = 0, *args, **kwargs) -> None:
        await asyncio.sleep(0 if seconds <= 0 else 3600)

    async def observed(timeout: float):
        if not consumer._get_active_partitions():
            idle.set()  # the call below goes idle: nothing awaited in between
        return await wait_next_records(timeout)

    consumer._wait_next_records = observed
    async with faust_app_running(app, stop_timeout=10):
        await wait_until(lambda: records - 1 in seen, STARTUP_TIMEOUT, "the first records")
        target = TP(name, 0)
        consumer.sleep = frozen_clock
        consumer.pause_partitions({target})
        await wait_until(idle.is_set, 60, "the fetcher to go idle")
        await produce(bootstrap, name, {0: [(None, b"after the resume")]})
        consumer.resume_partitions({target})
        await wait_until(lambda: records in seen, 30,
                         lambda: f"the record written after the resume (seen so far: {sorted(seen)})")


async def check_the_stall_check_skips_a_partition_not_yet_positioned(settings: Settings, transport_cls: type,
                                                                    records: int = 5) -> None:
    """Faust's livelock detector (``verify_event_path``, every few seconds) reads each assigned
    partition's position; just after an assignment aiokafka has none yet (it awaits its reset), and
    the failed ``assert self._position is not None`` crashed the whole worker (seen once in ~50
    chaos runs, 3 s after a rebalance). The partition is put in that state with aiokafka's own
    ``await_reset``, as an assignment leaves it, and the check is run at once."""
    app = build_app(settings, transport_cls)
    name, seen = await _one_partition_stream(settings, app, records)
    consumer = app.consumer
    async with faust_app_running(app, stop_timeout=10):
        await wait_until(lambda: records - 1 in seen, STARTUP_TIMEOUT, "the first records")
        aiokafka_consumer = consumer._thread._ensure_consumer()
        state = aiokafka_consumer._fetcher._subscriptions.subscription.assignment.state_value(TopicPartition(name, 0))
        state.await_reset(OffsetResetStrategy.EARLIEST)
        consumer.verify_event_path(time.monotonic(), TP(name, 0))  # Faust's: AssertionError


async def check_the_seek_to_committed_asks_once(settings: Settings, transport_cls: type,
                                               partitions: int = 6) -> None:
    """At every assignment Faust seeks each partition to its committed offset (``perform_seek``),
    and aiokafka's ``seek_to_committed`` asks the group coordinator once per partition, in turn:
    a worker holds about a hundred partitions, so on a three-broker cluster 0.5-2 s of every
    rebalance went on those round trips. One request must fetch them all, and each partition must
    land on its committed offset (records before it are not delivered again)."""
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, broker_commit_interval=3600, broker_commit_every=1_000_000,
                    stream_wait_empty=False)
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, partitions)
    await create_topic(bootstrap, name, partitions)
    await produce(bootstrap, name, {p: [(None, b"r")] * 10 for p in range(partitions)})
    committed = {p: 2 + p for p in range(partitions)}
    await commit_for_group(bootstrap, app.conf.id, {TopicPartition(name, p): o for p, o in committed.items()})
    delivered: dict[int, list[int]] = collections.defaultdict(list)

    @app.agent(topic)
    async def hold(stream):
        async for event in stream.noack().events():  # nothing acked: the committed offsets stay
            delivered[event.message.partition].append(event.message.offset)

    async with faust_app_running(app, stop_timeout=30):
        await wait_until(lambda: all(delivered[p][-1:] == [9] for p in committed), STARTUP_TIMEOUT, "the records")
        aiokafka_consumer = app.consumer._thread._ensure_consumer()
        coordinator = aiokafka_consumer._coordinator
        asked: list[list[TopicPartition]] = []
        fetch = coordinator._do_fetch_commit_offsets

        async def counted(tps):
            asked.append(list(tps))
            return await fetch(tps)

        coordinator._do_fetch_commit_offsets = counted
        sought = await app.consumer.seek_to_committed()
        positions = {p: await aiokafka_consumer.position(TopicPartition(name, p)) for p in committed}
    assert {p: min(offsets) for p, offsets in delivered.items()} == committed  # the seek at start-up
    assert {tp.partition: offset for tp, offset in sought.items() if tp.topic == name} == committed
    assert positions == committed
    assert len(asked) == 1, f"{len(asked)} requests to the coordinator for {len(sought)} partitions"


async def check_an_offset_lookup_waits_behind_no_long_fetch(settings: Settings, transport_cls: type,
                                                            longest_hold_ms: int = 250) -> None:
    """A broker answers a connection's requests in order, so an offset lookup (recovery makes three
    at every rebalance, a reset partition one) sent while an idle fetch is held waits until the
    broker gives that fetch up: Faust asks it to hold each fetch 1.5 s, and each lookup of a
    rebalance on the cluster took 1.5-1.7 s. While an idle worker looks up highwaters, every fetch
    it sends may be held at most ``longest_hold_ms``, and the lookups are answered."""
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, stream_wait_empty=False)
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, 2)
    await create_topic(bootstrap, name, 2)
    await produce(bootstrap, name, {0: [(None, b"r")], 1: [(None, b"r")] * 3})
    delivered = _collecting_agent(app, topic)  # offsets: 0 of partition 0; 0, 1, 2 of partition 1

    async with faust_app_running(app, stop_timeout=30):
        await wait_until(lambda: len(delivered) == 3, STARTUP_TIMEOUT, "the records")  # then idle
        client = app.consumer._thread._ensure_consumer()._client
        holds: list[int] = []
        send = client.send

        async def recorded(node_id, request, **kwargs):
            if isinstance(request, FetchRequest):  # aiokafka's (or a session's), versioned when sent
                holds.append(request._max_wait_ms)
            return await send(node_id, request, **kwargs)

        client.send = recorded
        highwaters = [await app.consumer.highwaters(TP(name, 0), TP(name, 1)) for _ in range(3)]
        await wait_until(lambda: len(holds) >= 3, STARTUP_TIMEOUT, "fetches while idle")
        client.send = send
    assert highwaters == [{TP(name, 0): 1, TP(name, 1): 3}] * 3
    assert max(holds) <= longest_hold_ms, (
        f"fetches held up to {max(holds)} ms: each offset lookup waits behind one")


async def check_idle_partitions_are_left_out_of_fetches(settings: Settings, transport_cls: type,
                                                       partitions: int = 8) -> None:
    """A worker reads about a hundred partitions; a fetch that names each of them costs the
    consumer thread a millisecond of encoding and decoding. Once records arrive on one partition
    only, the fetches that follow must name no other (Kafka's fetch sessions), and every record
    must still reach the agent, in order."""
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, stream_wait_empty=False)
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, partitions)
    await create_topic(bootstrap, name, partitions)
    delivered: list[int] = []
    _collecting_agent(app, topic, after_each=_append_to(delivered))

    async with faust_app_running(app, stop_timeout=30):
        await produce(bootstrap, name, {3: [(None, b"first")]})
        await wait_until(lambda: delivered == [0], STARTUP_TIMEOUT, "the first record")
        client = app.consumer._thread._ensure_consumer()._fetcher._client
        named: list[int] = []
        send = client.send

        async def recorded(node_id, request, **kwargs):
            response = await send(node_id, request, **kwargs)
            if isinstance(request, FetchRequest):  # what FetchRequest.build put on the wire
                named.append(sum(len(each) for _, each in request._topics))
            return response

        client.send = recorded
        for offset in range(1, 11):
            await produce(bootstrap, name, {3: [(None, b"next")]})
            await wait_until(lambda offset=offset: delivered[-1] == offset, 30, f"offset {offset}")
        client.send = send
    assert delivered == list(range(11))
    assert named and max(named) <= 1, f"partitions named per fetch: {named}"


def _append_to(offsets: list[int]):
    async def append(offset: int) -> None:
        offsets.append(offset)
    return append


# -- 3. A commit passes an unacked record (#606) ---------------------------------------------------------------

async def check_commit_stops_at_the_first_unacked_record(settings: Settings, transport_cls: type,
                                                         committed_before: int | None) -> None:
    """With offsets head+1..head+9 acked and ``head`` not, a commit must not pass ``head`` (the
    committed offset stays ``committed_before``, or none); once ``head`` is acked, it reaches head+10.

    ``committed_before=None``: no committed offset, head 0; Faust's ``_new_offset`` skips its check
    when the committed offset is None or 0. ``committed_before=c``: head c; Faust checks
    ``min(acked) - committed > 1``, which lets min(acked) = c + 1 through.
    """
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, broker_commit_interval=3600, broker_commit_every=1_000_000,
                    stream_wait_empty=False)
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, 1)
    await create_topic(bootstrap, name, 1)
    await produce(bootstrap, name, {0: [(None, b"r")] * 20})
    if committed_before is not None:
        await commit_for_group(bootstrap, app.conf.id, {TopicPartition(name, 0): committed_before})
    head = committed_before or 0

    events = {}

    @app.agent(topic)
    async def hold(stream):
        async for event in stream.noack().events():  # acked by the test, in its order
            events[event.message.offset] = event

    async with faust_app_running(app, stop_timeout=60):
        await wait_until(lambda: set(range(head, 20)) <= events.keys(), STARTUP_TIMEOUT, "the records")
        for offset in range(head + 1, head + 10):
            events[offset].ack()
        await app.consumer.commit()
        with_head_unacked = (await committed_offsets(bootstrap, app.conf.id, name)).get(0)
        events[head].ack()
        await app.consumer.commit()
        with_head_acked = (await committed_offsets(bootstrap, app.conf.id, name)).get(0)
    assert (with_head_unacked or 0, with_head_acked) == (head, head + 10), (
        f"offset {head} unacked, {head + 1}-{head + 9} acked: committed {with_head_unacked}; "
        f"then {head} acked: committed {with_head_acked}")


# -- 4. Pending table writes stall every stream (#629) ---------------------------------------------------------

class _ChangelogAcks(Sensor):
    """Counts the changelog writes Kafka acknowledged."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic, self.acked = topic, 0

    def on_send_completed(self, producer, state, metadata) -> None:
        if metadata.topic == self.topic:
            self.acked += 1


async def check_streams_flow_while_table_writes_wait(settings: Settings, transport_cls: type, table_cls: type,
                                                     writes: int = 1000, records: int = 50) -> list[int]:
    """An agent makes ``writes`` table writes in one step (as a catch-up does); records that arrive
    next must reach the stream while those writes are still on their way to Kafka. Faust holds back
    every record while more than 100 writes wait in its producer buffer, so it delivers each record
    only after some 100 more writes were sent, and most of them only once the writes are nearly done.
    Returns the number of writes pending at each delivery.
    """
    bootstrap, partitions = settings.require_bootstrap_servers(), 4
    app = build_app(settings, transport_cls, table_cls)
    name = f"{settings.topic_prefix}-events"
    topic = _raw_topic(app, name, partitions)
    table = app.Table("state", partitions=partitions, key_type=bytes, value_type=bytes)
    acks = _ChangelogAcks(table.changelog_topic.get_topic_name())
    app.sensors.add(acks)
    await create_topic(bootstrap, name, partitions)
    payload = b"x" * 12_000  # one write per producer batch (16 KiB), so the writes take many round trips

    issued = asyncio.Event()
    pending_at_delivery: list[int] = []

    @app.agent(topic)
    async def write_then_count(stream):
        async for event in stream.events():
            if event.value == b"go":
                for n in range(writes):
                    table[b"key-%d" % n] = payload
                issued.set()
            else:
                pending_at_delivery.append(writes - acks.acked)

    async with faust_app_running(app, stop_timeout=60):
        # The records go in with "go", so they already wait in the stream when the writes are issued:
        # how soon they are delivered then depends on the conductor alone, not on how long producing
        # them takes on a busy machine (produced afterwards, 525 of 1,000 writes were once acked first).
        await produce(bootstrap, name, {0: [(None, b"go")] + [(None, b"r")] * records})
        await wait_until(issued.is_set, STARTUP_TIMEOUT, "the agent to issue its table writes")
        await wait_until(lambda: len(pending_at_delivery) == records, 120, "the records")
        await wait_until(lambda: acks.acked == writes, 120, "the table writes")
    delivered_while_waiting = sum(pending >= writes // 2 for pending in pending_at_delivery)
    assert delivered_while_waiting == records, (
        f"{delivered_while_waiting} of {records} records reached the stream while at least {writes // 2} of "
        f"{writes} table writes were unacknowledged (writes pending at each delivery: {pending_at_delivery})")
    return pending_at_delivery


# -- 5. Changelog records recovery read are applied late, or not at all ----------------------------------------

async def check_records_recovery_read_are_in_the_table(settings: Settings, transport_cls: type, table_cls: type,
                                                        hold: bool, records: int = 10) -> None:
    """Recovery reads an active partition's changelog up to the highwater it measured first, but
    hands over whatever the fetch returned: here ``records`` written after the measure by another
    writer (Ferry's API writes each job's ``pending``). They must be in the table once it is live;
    and the values its owner writes next must still be there after the next rebalance.

    Faust keeps the records read once recovery has ended in a buffer, applied at the next
    rebalance over the owner's writes (recovery.py ``_slurp_changelogs``, ``flush_buffers`` in
    ``on_partitions_revoked``); with the owner's writes acknowledged after that (the worker waits
    for its writes as the rebalance goes on), the next recovery starts past them all. And with
    ``hold`` (recovery applies records slower than they come, as a standby catching up does), the
    records still in Faust's changelog queue when recovery resumes the flow are thrown away
    (``flow_control.resume()`` clears the queue), the consumer past them.
    """
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, table_cls, store="rocksdb://", stream_wait_empty=False)
    name, topic, _ = await _stream_and_recovered_table(settings, app, 1)
    _collecting_agent(app, topic)  # the stream partition that the table's partition goes with
    table = app.Table("jobs", partitions=1, key_type=bytes, value_type=bytes)
    changelog = table.changelog_topic.get_topic_name()
    await create_topic(bootstrap, changelog, 1)
    await produce(bootstrap, changelog, {0: [(b"other-%d" % n, b"1") for n in range(20)]})
    keys = [b"job-%d" % n for n in range(records)]
    recovery = app.tables.recovery
    build_highwaters = recovery._build_highwaters

    async def highwaters_then_writes(consumer, tps, destination, title) -> None:
        await build_highwaters(consumer, tps, destination, title)
        if title == "active" and app.consumer_generation_id == 1:  # past the highwater recovery reads to
            await produce(bootstrap, changelog, {0: [(key, b"pending") for key in keys]})

    async def hold_the_first(event) -> None:  # until the flow resumes at recovery's end
        if event.message.key == keys[0]:
            await wait_until(recovery.completed.is_set, 60, "recovery's end")

    recovery._build_highwaters = highwaters_then_writes
    if hold:
        table._on_changelog_event = hold_the_first

    async def send_the_writes(sender, revoked, **kwargs) -> None:  # Kafka has them during the rebalance
        await asyncio.gather(*(table.send_changelog(0, key, b"completed") for key in keys))

    def values() -> list[bytes | None]:
        return [table.data.get(key) for key in keys]

    async with faust_app_running(app, stop_timeout=60):
        await wait_until(lambda: recovery.completed.is_set() and not app.rebalancing, STARTUP_TIMEOUT,
                         "the table's recovery")
        for _ in range(50):  # up to 5 s for the records under way
            if (live := values()) == [b"pending"] * records:
                break
            await asyncio.sleep(0.1)
        for key in keys:  # the owner's writes: in its store now, in Kafka as the next rebalance goes on
            table.data[key] = b"completed"
        app.on_partitions_revoked.connect(send_the_writes)
        generation = app.consumer_generation_id

        async def rejoin() -> None:  # in the consumer's thread, where aiokafka's coordinator lives
            app.consumer._thread._ensure_consumer()._coordinator.request_rejoin()

        await app.consumer._thread.call_thread(rejoin)
        await wait_until(lambda: app.consumer_generation_id != generation and recovery.completed.is_set()
                         and not app.rebalancing, 60, "the rebalance to end")
        after = values()
    assert (live, after) == ([b"pending"] * records, [b"completed"] * records), (
        f"when the table went live: {live}; after the owner's writes and a rebalance: {after}")


# -- 6. Recovery's store check takes a lagging highwater, or a standby's live read offset, as final (#158) -----

async def check_a_standby_read_past_a_lagging_highwater_is_no_crash(settings: Settings, transport_cls: type,
                                                                     before: int = 5, after: int = 10,
                                                                     **overrides) -> None:
    """Recovery checks that no store is ahead of its changelog: for a standby partition Faust compares
    the offset read so far, live, with a highwater measured after the active recovery. A standby that
    reads records between the two (here the records its changelog queue held when the rebalance
    began, applied while the active recovery runs) is then past a highwater answer that lags them
    (on the three-broker cluster, a leader elected moments before answered so), and the worker
    crashed with ``ConsistencyError``. The worker must not crash, and the standby's table must hold
    every record.

    Two members of one group, so that each holds the other's changelog partition as a standby.
    The standby's reading is held on the last of ``before`` records, so that ``after`` more wait in
    the changelog queue as the rebalance begins; the highwater lookup of the standby, in the next
    recovery, waits until they are read and is answered with the broker's genuine answer of before
    they were written, as a lagging leader gives it. ``overrides`` are the apps' Faust settings:
    Faust's ``Recovery`` with its check on (over a changelog queue kept across resumes: Faust's own
    empties it, defect 11, and the standby never reads the queued records) crashes here.
    """
    bootstrap = settings.require_bootstrap_servers()
    other = settings.model_copy(update={"worker_data_dir": f"{settings.worker_data_dir}-other",
                                        "worker_web_port": settings.worker_web_port + 1})  # its own URL
    apps = [build_app(s, transport_cls, JobsTable, store="rocksdb://", stream_wait_empty=False, **overrides)
            for s in (settings, other)]
    app = apps[0]  # the worker under test
    tables = [a.Table("jobs", partitions=2, key_type=bytes, value_type=bytes) for a in apps]
    table, recovery, consumer = tables[0], app.tables.recovery, app.consumer
    changelog = table.changelog_topic.get_topic_name()
    await create_topic(bootstrap, changelog, 2)

    def standbys() -> set[TP]:
        return {tp for tp in app.assignor.assigned_standbys() if tp.topic == changelog}

    def settled() -> bool:
        return all(a.tables.recovery.completed.is_set() and not a.rebalancing for a in apps)

    async with contextlib.AsyncExitStack() as running:
        for a in apps:
            await running.enter_async_context(faust_app_running(a, stop_timeout=60))
        await wait_until(lambda: standbys() and settled(), STARTUP_TIMEOUT, "a standby partition")
        (target,) = standbys()
        keys = [key for key in (b"job-%d" % n for n in range(1000))
                if partition_for(key.decode(), 2) == target.partition][:before + after]
        last = before + after - 1  # the last record's offset

        held, release = asyncio.Event(), asyncio.Event()

        async def hold_the_last_before(event) -> None:  # the standby busy with a record as the rebalance begins
            if event.message.tp == target and event.message.offset == before - 1 and not release.is_set():
                held.set()
                await release.wait()

        table._on_changelog_event = hold_the_last_before
        await produce(bootstrap, changelog, {target.partition: [(key, b"before") for key in keys[:before]]})
        await wait_until(held.is_set, 60, "the standby to read the records")
        stale = await consumer.highwaters(target)  # the broker's answer, before the records below exist
        await produce(bootstrap, changelog, {target.partition: [(key, b"after") for key in keys[before:]]})
        queue = app.tables.changelog_queue
        await wait_until(lambda: queue.qsize() == after, 60, lambda: f"{after} records queued ({queue.qsize()})")

        generation = app.consumer_generation_id
        build_offsets, highwaters = recovery._build_offsets, consumer.highwaters

        async def offsets_then_release(consumer, tps, destination, title) -> None:
            await build_offsets(consumer, tps, destination, title)
            if title == "standby" and app.consumer_generation_id != generation:
                release.set()  # the queued records are read while the active recovery runs

        read_at_lookup: list[int | None] = []  # the standby's read offset when its highwater is looked up

        async def lagging(*tps):
            if set(tps) == {target} and release.is_set():
                with contextlib.suppress(TimeoutError):  # until the queued records are read; asserted below
                    async with asyncio.timeout(30):
                        while recovery.standby_offsets.get(target) != last:
                            await asyncio.sleep(0.05)
                read_at_lookup.append(recovery.standby_offsets.get(target))
                return dict(stale)
            return await highwaters(*tps)

        recovery._build_offsets, consumer.highwaters = offsets_then_release, lagging

        async def rejoin() -> None:  # in the consumer's thread, where aiokafka's coordinator lives
            consumer._thread._ensure_consumer()._coordinator.request_rejoin()

        await consumer._thread.call_thread(rejoin)

        def values() -> list[bytes | None]:
            return [table.data.get(key) for key in keys]

        expected = [b"before"] * before + [b"after"] * after
        await wait_until(lambda: recovery.crash_reason is not None or (
            app.consumer_generation_id != generation and settled() and values() == expected), 60,
            lambda: f"the next recovery (standby {target} holds {values()})")
        assert read_at_lookup[:1] == [last], f"the standby's read offset at its highwater lookup: {read_at_lookup}"
        assert recovery.crash_reason is None, f"the worker crashed: {recovery.crash_reason!r}"
        assert target in standbys(), "the rebalance moved the standby partition"
        assert values() == expected


async def check_an_active_store_past_a_lagging_highwater(settings: Settings, transport_cls: type,
                                                         lags: Literal["once", "always"] = "once",
                                                         before: int = 5, after: int = 5) -> None:
    """Recovery checks that no store is ahead of its changelog: for an active partition, the offset
    its store persisted (its own writes, once Kafka acknowledged them) with the highwater looked up
    at the rebalance. A leader elected moments before answers with a highwater that lags the writes
    it has (until its followers' next fetch), and the worker crashed with ``ConsistencyError``.

    One app recovers ``before`` changelog records and keeps the broker's answer; its table then
    writes ``after`` more, and a rejoin starts a rebalance whose highwater lookup is answered with
    that earlier answer: ``lags="once"``, the first lookup only (a leader that catches up): the
    worker must not crash, its bookkeeping must hold the real highwater and the table every value;
    ``lags="always"``, every lookup (the changelog really is behind the store): it must crash.
    """
    bootstrap = settings.require_bootstrap_servers()
    app = build_app(settings, transport_cls, JobsTable, store="rocksdb://", stream_wait_empty=False)
    table = app.Table("jobs", partitions=1, key_type=bytes, value_type=bytes)
    recovery, consumer = app.tables.recovery, app.consumer
    changelog = table.changelog_topic.get_topic_name()
    target, last = TP(changelog, 0), before + after - 1
    await create_topic(bootstrap, changelog, 1)
    keys = [b"job-%d" % n for n in range(before + after)]
    await produce(bootstrap, changelog, {0: [(key, b"before") for key in keys[:before]]})
    expected = [b"before"] * before + [b"after"] * after

    def values() -> list[bytes | None]:
        return [table.data.get(key) for key in keys]

    async with faust_app_running(app, stop_timeout=60):
        await wait_until(lambda: recovery.completed.is_set() and not app.rebalancing
                         and values()[:before] == expected[:before], STARTUP_TIMEOUT, "the table's recovery")
        stale = await consumer.highwaters(target)  # the broker's answer, before the writes below
        await asyncio.gather(*(table.write(key, b"after") for key in keys[before:]))
        await wait_until(lambda: table.persisted_offset(target) == last, 60,
                         lambda: f"the store's offset {last} (at {table.persisted_offset(target)})")

        generation, highwaters = app.consumer_generation_id, consumer.highwaters
        lagged: list[dict] = []  # the lagging answers given

        async def lagging(*tps):
            if target in tps and app.consumer_generation_id != generation and (lags == "always" or not lagged):
                lagged.append({**(await highwaters(*tps)), **stale})
                return lagged[-1]
            return await highwaters(*tps)

        consumer.highwaters = lagging

        async def rejoin() -> None:  # in the consumer's thread, where aiokafka's coordinator lives
            consumer._thread._ensure_consumer()._coordinator.request_rejoin()

        await consumer._thread.call_thread(rejoin)
        await wait_until(lambda: recovery.crash_reason is not None or (
            app.consumer_generation_id != generation and recovery.completed.is_set() and not app.rebalancing), 60,
            "the next recovery")
        assert lagged, "no highwater lookup in the next recovery"
        if lags == "always":
            assert isinstance(recovery.crash_reason, ConsistencyError), (
                f"a store ahead of its changelog at every lookup: crash {recovery.crash_reason!r}")
            return
        assert recovery.crash_reason is None, f"the worker crashed: {recovery.crash_reason!r}"
        assert recovery.active_highwaters[target] == last, f"highwater kept: {recovery.active_highwaters[target]}"
        assert values() == expected
