"""Faust's Kafka transport with a consumer that hands records to the streams without a task each.

Faust's consumer delivers every fetched record through ``wait_first(deliver(record),
suspend_flow.wait())``: four tasks created, awaited and cancelled per record, so each record
costs several turns of the event loop. On a worker whose loop is busy with provider calls a
turn takes a millisecond or more, and delivery, not the work, became the limit: at 200 jobs/s
the delivery loop spent 43-69 % of its time in those waits, records reached the streams
1.2-1.7 s after they were written, and end-to-end p50 was 1.7 s; delivering directly, it was
under 0.1 s.

``FerryConsumer`` awaits the delivery directly whenever it cannot block: flow is on (no
rebalance under way), Faust's producer buffer is below the level at which the delivery waits
for it, and no stream that takes the record has a full buffer. Otherwise it falls back to
Faust's way, so a rebalance can still interrupt a delivery that waits. Everything else the loop
does (read offsets, gaps, commit every N acks, yielding to the loop) is as in Faust 0.15.
"""

from __future__ import annotations

import asyncio

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka


class FerryConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, delivering records without a task per record when it can."""

    YIELD_EVERY = 100  # records delivered before letting the loop run other tasks

    def _delivery_cannot_block(self, tp) -> bool:
        app = self.app
        buffer = app.producer.buffer
        return (self.flow_active and not self.suspend_flow.is_set() and app.flow_control.is_active()
                and buffer.size <= buffer.max_messages
                and not any(channel.queue.full() for channel in app.topics._tp_index.get(tp, ())))

    async def _drain_messages(self, fetcher) -> None:  # runs as the Fetcher service's task
        deliver = self.callback
        read_offsets = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        since_yield = 0
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                self.diag.set_flag(CONSUMER_FETCHING)
                records = self.getmany(timeout=1.0)
                await self.sleep(0)  # getmany may return at once, over and over
                if self.should_stop:
                    continue
                async for tp, message in records:
                    since_yield += 1
                    if since_yield > self.YIELD_EVERY:
                        await asyncio.sleep(0)
                        since_yield = 0
                    read = read_offsets[tp]
                    if read is not None and message.offset < read:
                        continue  # delivered already
                    if read and message.offset - read > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, read + 1, message.offset)
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if self._delivery_cannot_block(tp):
                        await deliver(message)
                    else:
                        await self.wait_first(deliver(message), self.suspend_flow.wait())
                    read_offsets[tp] = message.offset
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if not self.transport.app.should_stop:
                raise
        except asyncio.CancelledError:
            if not self.transport.app.should_stop:
                raise
        except Exception:
            self.log.exception("Delivering records failed")
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


class FerryTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, with ``FerryConsumer``."""

    Consumer = FerryConsumer
