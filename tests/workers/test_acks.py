"""Request events are acked only after their write, and in offset order per partition."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faust.types import TP

from workers.acks import OrderedAcks

ACKED: list[tuple[TP, int]] = []


@dataclass
class Message:
    tp: TP
    offset: int


@dataclass
class Event:
    message: Message
    acked: list = field(default_factory=lambda: ACKED)

    def ack(self) -> None:
        self.acked.append((self.message.tp, self.message.offset))


P0, P1 = TP("requests", 0), TP("requests", 1)


async def test_acks_wait_for_writes_and_keep_offset_order() -> None:
    ACKED.clear()
    acks = OrderedAcks()
    loop = asyncio.get_running_loop()
    write0, write2 = loop.create_future(), loop.create_future()
    acks.ack_after(Event(Message(P0, 0)), write0)
    acks.ack_after(Event(Message(P0, 1)), None)  # nothing to write, but behind offset 0
    acks.ack_after(Event(Message(P0, 2)), write2)
    acks.ack_after(Event(Message(P1, 0)), None)  # another partition is not held up
    await asyncio.sleep(0)
    assert ACKED == [(P1, 0)]

    write2.set_result(None)
    await asyncio.sleep(0.01)
    assert ACKED == [(P1, 0)]  # offset 2 is written, but 0 is not yet

    write0.set_result(None)
    await asyncio.sleep(0.01)
    assert ACKED == [(P1, 0), (P0, 0), (P0, 1), (P0, 2)]


async def test_a_failed_write_stops_acks_of_its_partition() -> None:
    ACKED.clear()
    acks = OrderedAcks()
    failed = asyncio.get_running_loop().create_future()
    acks.ack_after(Event(Message(P0, 0)), failed)
    acks.ack_after(Event(Message(P0, 1)), None)
    failed.set_exception(RuntimeError("broker gone"))
    await asyncio.sleep(0.01)
    acks.ack_after(Event(Message(P0, 2)), None)
    await asyncio.sleep(0.01)
    assert ACKED == []  # read again by the partition's next owner
