"""Faust's aiokafka consumer with its record drops and early commits fixed where they happen.

See ``workers/faust_layer/__init__.py`` for each defect, its upstream issue and its test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

from aiokafka import TopicPartition
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.utils.functional import consecutive_numbers

from app.fetch_sessions import use_fetch_sessions

# How long the broker may hold a fetch with nothing to return. Faust fixes 1,500 ms; a broker
# answers a connection's requests in order, so each offset lookup sent behind an idle fetch (three
# in a table's recovery, one per reset partition) waited out the rest of it: 1.5 s apiece on a
# rebalance. A fetch with records to return comes back at once either way.
FETCH_MAX_WAIT_MS = 100


class FerryConsumer(faust_aiokafka.Consumer):
    """Every fetched record is delivered or fetched again; no commit passes an unacked record;
    a record is delivered without a task of its own when the delivery cannot block."""

    YIELD_EVERY = 100  # records delivered before letting the loop run other tasks

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._first_delivered: dict[TP, int] = {}  # per partition: first offset delivered since the last seek
        self._discarded: dict[TP, int] = {}  # per partition: first offset of the current batch not delivered
        self._resumed = asyncio.Event()  # set when partitions are resumed

    async def getmany(self, timeout: float) -> AsyncGenerator[tuple[TP, Message], None]:
        """Faust's ``getmany`` (round robin over partitions), except that a record it does not
        deliver (flow stopped, generation changed, partition not active) is fetched again: its
        partition is sought back to it, if still assigned. Faust relied on a seek to the committed
        offset, which does nothing for a partition without one: its first records were lost."""
        records, active = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return
        generation = self.app.consumer_generation_id
        self._discarded = discarded = cast(dict[TP, int], {})
        batch = list(self.scheduler.iterate(records))
        position = 0  # of the record handed to the caller, which may be under way
        try:
            for position, (tp, record) in enumerate(batch):  # noqa: B007 (read by the finally)
                if (tp not in discarded and self._open(tp, generation)
                        and (active is None or tp in active or tp in self._buffered_partitions)):
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))  # for the lag figure
                    yield tp, self._to_message(tp, record)
                else:
                    discarded.setdefault(tp, record.offset)
            position = len(batch)
        finally:
            # Left early (the caller failed or stopped): the record under way and the rest are
            # fetched again too.
            for tp, record in batch[position:]:
                discarded.setdefault(tp, record.offset)
            if discarded:
                await self._thread.call_thread(self._seek_back, dict(discarded))

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's stall check, for partitions aiokafka has positioned: it read the position of one
        just assigned (awaiting its reset), and the failed assertion crashed the worker."""
        assignment = self._thread._ensure_consumer()._fetcher._subscriptions.subscription.assignment
        state = assignment.state_value(TopicPartition(tp.topic, tp.partition)) if assignment else None
        if state is not None and state.has_valid_position:
            super().verify_event_path(now, tp)

    async def _wait_next_records(self, timeout: float) -> tuple[Any, set[TP] | None]:
        """Faust's, except that with no partition active it waits until one is resumed (up to
        ``timeout``), not a whole second: the stream partitions resumed as recovery ends waited
        out that second before their first fetch."""
        if self.flow_active and not self.app.client_only and not self._get_active_partitions():
            self._resumed.clear()
            await self.wait(self._resumed.wait(), timeout=timeout)
            return {}, set()  # fetched by the next call
        return await super()._wait_next_records(timeout)

    def _new_consumer_thread(self) -> FerryConsumerThread:
        return FerryConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def resume_partitions(self, tps) -> None:
        super().resume_partitions(tps)
        self._resumed.set()

    async def _seek_back(self, firsts: dict[TP, int]) -> None:
        """(In the consumer's thread.) Seek each partition back to its first undelivered record,
        only backwards and only if it is still assigned (else its next owner reads it)."""
        consumer = self._thread._ensure_consumer()
        assignment = consumer._subscription.subscription and consumer._subscription.subscription.assignment
        for tp, offset in firsts.items():
            state = assignment.state_value(tp) if assignment else None
            if state is not None and state.has_valid_position and state.position > offset:
                consumer.seek(tp, offset)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Each assigned partition to its committed offset, all asked of the coordinator at once:
        aiokafka asks once per partition, in turn (a hundred round trips, 0.5-2 s of each
        rebalance on a three-broker cluster)."""
        return await self._thread.call_thread(self._seek_all_to_committed)

    async def _seek_all_to_committed(self) -> Mapping[TP, int]:
        consumer = self._thread._ensure_consumer()
        assigned = consumer._subscription.assigned_partitions()
        committed = await consumer._coordinator.fetch_committed_offsets(assigned)
        offsets = {tp: committed[tp].offset if tp in committed else None for tp in assigned}
        for tp, offset in offsets.items():
            if offset:  # aiokafka's rule: an offset of 0 needs no seek
                consumer.seek(tp, offset)
        return cast(Mapping[TP, int], offsets)  # None for none committed, as aiokafka's (and Faust reads)

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets at each assignment; a stream partition with no
        committed offset goes back to its log's start, so that records Faust queued before the
        rebalance and then cleared are delivered again."""
        await super().perform_seek()
        self._first_delivered = {}
        uncommitted = [tp for tp in self.assignment() if tp.topic not in self.app.tables.changelog_topics
                       and self._committed_offset.get(tp) is None]
        if uncommitted:
            await self._thread.seek_to_beginning(*(TopicPartition(tp.topic, tp.partition) for tp in uncommitted))

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit: past the acked records that follow the last commit without a gap.

        Faust's version commits past an unacked head record: its check is off by one (#606) and
        is skipped when nothing was committed yet. Ferry's topics have no offset gaps (no
        transactions, request and event topics are not compacted), so no gap bookkeeping.
        """
        acked = self._acked[tp]
        acked.sort()
        head = self._committed_offset.get(tp)
        head = self._first_delivered.get(tp) if head is None else head
        if not acked or acked[0] != head:  # head None (nothing delivered or committed): no commit
            return None
        batch = next(consecutive_numbers(acked))
        acked[: len(batch)] = []
        self._acked_index[tp].difference_update(batch)
        return batch[-1] + 1

    def _open(self, tp: TP, generation: int | None) -> bool:
        """Whether a record of ``tp`` fetched in ``generation`` may be handed over now: same
        generation, flow on, and, for a stream's record, the rebalance over. Until it is, the
        recovery's ``flow_control.resume()`` empties every stream's buffer (mode clears the queues
        on resume), so a record handed over earlier would be lost."""
        return (self.flow_active and generation == self.app.consumer_generation_id
                and not (self.app.rebalancing and tp.topic not in self.app.tables.changelog_topics))

    def _delivery_cannot_block(self, tp: TP) -> bool:
        return (self.flow_active and not self.suspend_flow.is_set() and self.app.flow_control.is_active()
                and self.app.producer.buffer.size <= self.app.producer.buffer.max_messages
                and not any(channel.queue.full() for channel in cast(Any, self.app.topics)._tp_index.get(tp, ())))

    async def _deliver(self, message: Message) -> bool:
        """Hand a record to its streams; False if a rebalance interrupted the hand-over.

        Faust wraps every delivery in ``wait_first(deliver, suspend_flow.wait())``: four tasks per
        record, a limit on a busy loop. Directly when the delivery cannot block; else Faust's way.
        """
        if self._delivery_cannot_block(message.tp):
            await self.callback(message)
            return True
        delivery = asyncio.ensure_future(self.callback(message))
        suspended = asyncio.ensure_future(self.suspend_flow.wait())
        await asyncio.wait({delivery, suspended}, return_when=asyncio.FIRST_COMPLETED)
        suspended.cancel()
        if delivery.done():
            delivery.result()
            return True
        delivery.cancel()
        return False

    async def _drain_messages(self, fetcher) -> None:  # the Fetcher service's task
        delivered = 0
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                self.diag.set_flag(CONSUMER_FETCHING)
                records = self.getmany(timeout=1.0)
                await self.sleep(0)  # getmany may return at once, over and over
                if self.should_stop:
                    continue
                try:
                    async for tp, message in records:
                        delivered += 1
                        if delivered % self.YIELD_EVERY == 0:
                            await asyncio.sleep(0)
                        read = self._read_offset[tp]
                        if read is not None and message.offset < read:
                            continue  # delivered already
                        if self._commit_every is not None and self._n_acked >= self._commit_every:
                            self._n_acked = 0
                            await self.commit()
                        # A rebalance while the commit or the delivery waited: the stream skips the
                        # record (old generation), and the rebalance has sought the partition back;
                        # the read offset must not move past the records fetched again.
                        if self._open(tp, message.generation_id):
                            self._first_delivered.setdefault(tp, message.offset)
                            if await self._deliver(message) and self._open(tp, message.generation_id):
                                self._read_offset[tp] = message.offset
                                continue
                        self._discarded.setdefault(tp, message.offset)  # fetched again
                finally:
                    await records.aclose()  # now, not when collected: seeks back what was not delivered
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors + (asyncio.CancelledError,):
            if not self.transport.app.should_stop:
                raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


class FerryConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose aiokafka consumer long-polls for ``FETCH_MAX_WAIT_MS`` and
    fetches within sessions (``app/fetch_sessions.py``): a worker reads about a hundred partitions,
    and without them each fetch named every one."""

    async def on_start(self) -> None:
        await super().on_start()
        await use_fetch_sessions(self._consumer)

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
        return consumer


class FerryTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, with ``FerryConsumer``."""

    Consumer = FerryConsumer
