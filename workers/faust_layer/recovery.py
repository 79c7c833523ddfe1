"""Faust's table manager and recovery: a changelog queue kept across resumes, the store check at reading's start."""

from __future__ import annotations

from faust.exceptions import ConsistencyError
from faust.tables.manager import TableManager
from faust.tables.recovery import E_PERSISTED_OFFSET, Recovery
from faust.types import TP


class FerryRecovery(Recovery):
    """Faust's recovery; the check that no store is ahead of its changelog (a topic emptied under a
    kept store) compares where reading starts with the highwater. Faust compared a standby's live
    read offset: the standby is read during the active recovery, and a highwater measured after
    that can be behind what was read (a leader elected moments before answers with its lagging
    highwater): the worker crashed (Faust #158)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._start_offsets: dict[TP, int] = {}  # per standby partition: where this round's reading began

    async def _build_offsets(self, consumer, tps, destination, title) -> None:
        await super()._build_offsets(consumer, tps, destination, title)
        if title == "active":  # measured after the highwaters, before any is read
            self._check(tps, destination, self.active_highwaters)
        else:
            self._start_offsets.update({tp: destination[tp] for tp in tps})

    async def _build_highwaters(self, consumer, tps, destination, title) -> None:
        await super()._build_highwaters(consumer, tps, destination, title)
        if title == "standby":  # measured after the standbys were read for a while
            self._check(tps, self._start_offsets, destination)

    @staticmethod
    def _check(tps, starts, highwaters) -> None:
        for tp in tps:
            if starts.get(tp) and highwaters[tp] and starts[tp] > highwaters[tp]:
                raise ConsistencyError(E_PERSISTED_OFFSET.format(tp, starts[tp], highwaters[tp]))


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
