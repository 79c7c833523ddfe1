"""The jobs of this worker's partitions: reads and writes of the jobs table, and the indexes the
maintenance timer and the lanes need (what expires when, what is processing, what waits for which
provider) so that they never scan the table."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.jobs import JobState, JobStatus, utcnow
from app.retry import Backoff
from workers.expiry import ExpiryIndex
from workers.faust_layer import JobsTable

log = logging.getLogger(__name__)


class PartitionMoved(Exception):
    """The job's partition is no longer this worker's: its new owner writes the job."""


class JobBook:
    def __init__(self, table: JobsTable, partitions: int) -> None:
        self.table = table
        self.partitions = partitions
        self.processing: set[str] = set()
        # Per provider, the jobs waiting in its lane, oldest first (a dict keeps insertion order).
        self.waiting: dict[str, dict[str, None]] = {}
        self._expiries = ExpiryIndex()

    def partition_of(self, job_id: str) -> int:
        return self.table.partition_for_key(job_id.encode())

    def get(self, job_id: str) -> JobState | None:
        raw = self.table.data.get(job_id.encode())  # the store itself: one lookup, not two
        return JobState.from_bytes(raw) if raw is not None else None

    def put(self, state: JobState) -> asyncio.Future:
        """Write a job's state (from any task); the future is done when Kafka has it."""
        self._track(state)
        return self.table.write(state.id.encode(), state.to_bytes())

    def expire_due(self) -> list[asyncio.Future]:
        """Delete the jobs whose ``expires_at`` has passed (a tombstone each on the changelog)."""
        now, deletes = utcnow(), []
        for job_id in self._expiries.pop_due(now):
            state = self.get(job_id)
            if state is not None and state.is_expired(now):
                deletes.append(self.table.write(job_id.encode(), None))
        return deletes

    def rebuild(self, owned: set[int]) -> None:
        """Rebuild the indexes from the table, for the partitions now owned (after recovery)."""
        self._expiries.clear()
        self.forget_assignment()
        waiting = []
        for key, raw in list(self.table.items()):
            if self.table.partition_for_key(key) in owned:
                state = JobState.from_bytes(raw)
                if state.waiting_for is not None:
                    waiting.append(state)
                else:
                    self._track(state)
        for state in sorted(waiting, key=lambda s: s.created_at):  # each lane in submit order
            self._track(state)

    def forget_assignment(self) -> None:
        """Drop what is processing or waiting: rebuilt once the next assignment is recovered."""
        self.processing.clear()
        self.waiting.clear()

    def _track(self, state: JobState) -> None:
        if state.status is JobStatus.processing:
            self.processing.add(state.id)
        else:
            self.processing.discard(state.id)
        for jobs in self.waiting.values():  # a lane per limited provider: a few at most
            jobs.pop(state.id, None)
        if state.status is JobStatus.pending and state.waiting_for is not None:
            self.waiting.setdefault(state.waiting_for, {})[state.id] = None
        if state.expires_at is not None:
            self._expiries.add(state.expires_at, state.id)

    async def until_acknowledged(self, job_id: str, write: asyncio.Future, owns: Callable[[int], bool]) -> None:
        """Await a write, sending the job's current value again while Kafka refuses it (the table
        already holds it, so nothing else would send it). PartitionMoved once not ``owns``."""
        key, partition, backoff = job_id.encode(), self.partition_of(job_id), Backoff(0.1, 5.0)
        while True:
            try:
                await asyncio.shield(write)
                return
            except Exception as exc:
                if not owns(partition):
                    raise PartitionMoved(job_id) from exc
                delay = await backoff.wait()
                log.warning("changelog write of job %s failed (%s); sent again after %.1f s", job_id,
                            type(exc).__name__, delay)
            value = self.table.data.get(key)
            if value is None:
                return  # expired and deleted since
            if not owns(partition):
                raise PartitionMoved(job_id)
            write = self.table.send_changelog(partition, key, value)
