"""Acking request events only once their ``processing`` record is in Kafka, in offset order.

Two Faust behaviours make the obvious "ack when the agent moves on" unsafe for the request
stream:

- Faust commits an offset after flushing its producer, but its buffer flush gives up after
  0.1 s without a send completing (``ProducerBuffer.flush_atmost`` in 0.15.3), so under load
  an offset can be committed before the table writes of the events below it reach Kafka. A
  crash then leaves a committed request whose job is still ``pending``: stuck.
- Acks out of offset order let Faust commit past an unacked event (faust-streaming #606).

So each request event is acked when the changelog write of its ``processing`` record has
been acknowledged by Kafka, and never before the events ahead of it in its partition. If that
write fails, neither it nor any later event of the partition is acked: the worker that next
owns the partition reads them again.
"""

from __future__ import annotations

import asyncio
import logging

import faust
from faust.types import TP

log = logging.getLogger(__name__)


class OrderedAcks:
    def __init__(self) -> None:
        self._tails: dict[TP, asyncio.Future] = {}  # per partition: done when its last ack is

    def ack_after(self, event: faust.EventT, write: asyncio.Future | None) -> None:
        """Ack ``event`` once ``write`` (if any) and every earlier ack of its partition are done."""
        tp = event.message.tp
        waits = [f for f in (self._tails.get(tp), write) if f is not None and (not f.done() or f.exception())]
        if not waits:
            event.ack()
            return
        tail = asyncio.get_running_loop().create_future()
        self._tails[tp] = tail
        asyncio.ensure_future(self._ack_when_done(event, waits, tail))

    @staticmethod
    async def _ack_when_done(event: faust.EventT, waits: list[asyncio.Future], tail: asyncio.Future) -> None:
        try:
            for future in waits:
                await asyncio.shield(future)
        except Exception as exc:
            log.error("not acking %s offset %s: an earlier write failed (%s); it will be read again",
                      event.message.tp, event.message.offset, exc)
            tail.set_exception(exc)
            tail.exception()  # retrieved: later acks of the partition fail on it instead
            return
        event.ack()
        tail.set_result(None)

    def forget(self, partitions: set[TP]) -> None:
        """Drop the chains of revoked partitions; their unacked events are read again elsewhere."""
        for tp in partitions:
            self._tails.pop(tp, None)
