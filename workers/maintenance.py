"""The worker's maintenance timer: deletes expired jobs and resumes orphans, writing the table directly.

An orphan is a job ``processing`` in one of this worker's partitions whose worker has left the
consumer group (or is this one, and no longer runs it). Its request is read again from Kafka,
in batches of nearby offsets, and started again; a job that ``job_max_attempts`` workers have
started without finishing is poison: its request goes to the dead-letter topic and it fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from app.jobs import JobRequest, JobState, JobStatus, Outcome
from app.topics import dead_letter_topic
from workers.caller import service_error
from workers.faust_layer import group_members
from workers.request_fetcher import request_gone

if TYPE_CHECKING:
    from workers.app import FerryWorker

log = logging.getLogger(__name__)

RESUME_BATCH = 1000  # orphans whose requests are read from Kafka at once


class Maintenance:
    def __init__(self, worker: FerryWorker) -> None:
        self.worker = worker
        self._resuming: asyncio.Task | None = None
        self.poisoned_jobs = 0

    def tick(self) -> None:
        """One round: expiries now; a resume pass in the background unless one still runs; each
        lane with waiting jobs running (a lane whose loop failed starts again)."""
        self.worker.lanes.wake_all()
        for delete in self.worker.book.expire_due():
            delete.add_done_callback(lambda f: f.cancelled() or f.exception())  # failed: expired again later
        if self._resuming is None or self._resuming.done():
            orphans = self.orphans()
            if orphans:
                self._resuming = asyncio.ensure_future(self.resume(orphans))

    def orphans(self) -> list[JobState]:
        """Processing jobs of this worker's partitions that no live worker runs, in request order."""
        worker, book = self.worker, self.worker.book
        members, owned, orphans = group_members(worker.app), worker.owned(), []
        for job_id in book.processing - worker.runner.in_flight.keys() - worker.in_transit:
            partition = book.partition_of(job_id)
            if worker.events_pending(partition) or partition not in owned:
                continue
            state = book.get(job_id)
            if (state is not None and state.status is JobStatus.processing and state.request is not None
                    and (state.runner in (None, worker.id) or state.runner not in members)):
                orphans.append(state)
        return sorted(orphans, key=lambda s: (s.request.topic, s.request.partition, s.request.offset))  # type: ignore[union-attr]

    async def resume(self, orphans: list[JobState]) -> None:
        """Start the orphans again, reading their requests a batch at a time."""
        worker, book = self.worker, self.worker.book
        began, started = time.monotonic(), 0
        log.info("resuming %d orphaned jobs", len(orphans))
        for first in range(0, len(orphans), RESUME_BATCH):
            batch = orphans[first:first + RESUME_BATCH]
            found = await worker.when_reachable(worker.fetcher.fetch_many, [state.request for state in batch])
            if found is None:
                return  # stopping
            for state in batch:
                if book.get(state.id) != state or state.id in worker.runner.in_flight:
                    continue  # finished or started since
                assert state.request is not None
                raw = found.get(state.request)
                if raw is None:
                    book.put(state.finished(request_gone(state.request_type)))
                elif state.attempts >= worker.settings.job_max_attempts:
                    await self.give_up(state, JobRequest.from_bytes(raw))
                elif not await worker.runner.wait_for_slot():
                    return
                elif not worker.owns(book.partition_of(state.id)):
                    worker.runner.release_slot()
                else:
                    worker.start(state, JobRequest.from_bytes(raw), state.request)
                    started += 1
        log.info("started %d of %d orphaned jobs again in %.2f s", started, len(orphans), time.monotonic() - began)

    async def give_up(self, state: JobState, request: JobRequest) -> None:
        """Fail a poison job, after copying its request to the dead-letter topic."""
        worker = self.worker
        assert state.request is not None
        reason = (f"job abandoned after {state.attempts} attempts: each worker that started it "
                  f"stopped before finishing it")
        where = f"{state.request.topic}/{state.request.partition}/{state.request.offset}"
        sent = await worker.dead_letters.send(key=request.id.encode(), value=request.to_bytes(),
                                              partition=worker.book.partition_of(request.id),
                                              headers={"ferry-reason": reason.encode(), "ferry-source": where.encode()})
        await sent
        self.poisoned_jobs += 1
        log.error("job %s: %s; request copied to %s", request.id, reason, dead_letter_topic(worker.settings))
        error = service_error(500, reason, "job_abandoned", request.targets[0], request.request_type)
        worker.book.put(state.finished(Outcome(status_code=500, error=error)))
