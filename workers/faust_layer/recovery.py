"""Faust's table manager and recovery: a changelog queue kept across resumes, the store check at reading's start."""

from __future__ import annotations

import asyncio

from faust.exceptions import ConsistencyError
from faust.tables.manager import TableManager
from faust.tables.recovery import E_PERSISTED_OFFSET, Recovery
from faust.types import TP

# A leader elected moments before answers with its lagging highwater until its followers' next
# fetch (well under a second): a store found ahead is asked about again, up to 20 x 0.25 s = 5 s.
RECHECKS, RECHECK_PAUSE = 20, 0.25


class FerryRecovery(Recovery):
    """Faust's recovery; the check that no store is ahead of its changelog (a topic emptied under a
    kept store) compares where reading starts with the highwater. Faust compared a standby's live
    read offset: the standby is read during the active recovery, and a highwater measured after
    that can be behind what was read (a leader elected moments before answers with its lagging
    highwater): the worker crashed (Faust #158). A lagging answer is behind a store's persisted
    offset too (an active's, its own writes): a store is declared ahead only if a highwater
    measured again still says so."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._start_offsets: dict[TP, int] = {}  # per standby partition: where this round's reading began

    async def _build_offsets(self, consumer, tps, destination, title) -> None:
        await super()._build_offsets(consumer, tps, destination, title)
        if title == "active":  # measured after the highwaters, before any is read
            await self._check(consumer, tps, destination, self.active_highwaters)
        else:
            self._start_offsets.update({tp: destination[tp] for tp in tps})

    async def _build_highwaters(self, consumer, tps, destination, title) -> None:
        await super()._build_highwaters(consumer, tps, destination, title)
        if title == "standby":  # measured after the standbys were read for a while
            await self._check(consumer, tps, self._start_offsets, destination)

    @staticmethod
    async def _check(consumer, tps, starts, highwaters) -> None:
        def ahead(tps) -> list[TP]:
            return [tp for tp in tps if starts.get(tp) and highwaters[tp] and starts[tp] > highwaters[tp]]

        for _ in range(RECHECKS):
            if not (found := ahead(tps)):
                return
            await asyncio.sleep(RECHECK_PAUSE)
            # The fresh answer replaces the lagging one (recovery reads up to it), kept - 1 as Faust
            # keeps it; assigned, as a Counter's update() would add it.
            for tp, highwater in (await consumer.highwaters(*found)).items():
                highwaters[tp] = -1 if highwater is None else highwater - 1
        if found := ahead(tps):
            raise ConsistencyError(E_PERSISTED_OFFSET.format(found[0], starts[found[0]], highwaters[found[0]]))


class FerryTableManager(TableManager):
    """Faust's table manager, recovering with ``FerryRecovery``; its changelog queue is not emptied
    when the flow resumes (recovery resumes it up to three times): records handed over were lost,
    the consumer and recovery's offsets past them."""

    @property
    def changelog_queue(self):
        if self._changelog_queue is None:
            self._changelog_queue = self.app.FlowControlQueue(maxsize=self.app.conf.stream_buffer_maxsize)
        return self._changelog_queue

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = FerryRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
