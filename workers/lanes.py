"""A lane per limited provider: a job waits for its provider's room in Kafka, not in a worker slot.

Requests of every provider share the request partitions, in order, and the worker holds a
bounded number of jobs (``worker_max_in_flight``). A job that waited in its slot for a provider
at its ``max_concurrency`` or ``requests_per_minute`` would stall every other provider's jobs
once the slots were full of them. So the request agent admits a job of a limited provider only
when the provider has room now (its first call's place is claimed at once) and no earlier job of
that provider waits; otherwise the job is recorded as waiting (``pending``, with its provider and
where its request sits) and its request event is acked once Kafka has that record. Its request
stays in Kafka. The lane's loop then starts its waiting jobs in order as the provider's limits
allow, reading their requests again, a batch at a time.

Nothing is lost: a waiting job's record is in the changelog before its request is committed, and
a partition's next owner rebuilds the lanes from the table (``JobBook.rebuild``). Providers
without limits have no lane: their jobs are started as they come, bounded by the worker's slots.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING

from app.jobs import JobRequest, JobState, RequestLocation, RequestType
from workers.limits import Claim, ProviderLimits
from workers.request_fetcher import request_gone

if TYPE_CHECKING:
    from workers.app import FerryWorker

log = logging.getLogger(__name__)

START_BATCH = 200  # waiting jobs whose requests are read from Kafka at once
IDLE_PAUSE = 0.5  # seconds before a lane looks again when none of its head could start (partitions moving)


class Lanes:
    def __init__(self, worker: FerryWorker) -> None:
        self._worker = worker
        self._loops: dict[str, asyncio.Task] = {}
        self._lanes: dict[tuple[str, RequestType], tuple[str, ProviderLimits] | None] = {}  # asked per job

    def limits_of(self, request: JobRequest) -> tuple[str, ProviderLimits] | None:
        """The lane a request joins: its first target's provider, if that one is limited here."""
        provider, request_type = request.targets[0].provider, request.request_type
        if (provider, request_type) not in self._lanes:
            endpoint = self._worker.settings.provider_endpoints.get(provider)
            limits = (self._worker.caller.limits_for(endpoint)
                      if endpoint is not None and request_type in endpoint.request_types else None)
            # None when unlimited, or when the call fails at once (not configured for the type).
            self._lanes[provider, request_type] = (provider, limits) if limits is not None and limits.limited else None
        return self._lanes[provider, request_type]

    def waiting(self) -> dict[str, int]:
        """Jobs waiting in each lane."""
        return {provider: len(jobs) for provider, jobs in self._worker.book.waiting.items() if jobs}

    async def admit(self, state: JobState, request: JobRequest,
                    location: RequestLocation) -> tuple[Claim | None, asyncio.Future | None]:
        """Admit a taken request: ``(claim, None)`` to start it now, with its first call's place
        when its provider is limited; ``(None, write)`` when it waits in its lane instead, the
        write being its waiting record (ack the request once Kafka has it)."""
        lane = self.limits_of(request)
        if lane is None:
            return None, None
        provider, limits = lane
        if not self._worker.book.waiting.get(provider):  # no earlier job waits: it may go first
            claim = await limits.claim_now()
            if claim is not None:
                return claim, None
        write = self._worker.book.put(state.waiting(location, provider))
        self.wake(provider)
        return None, write

    def wake(self, provider: str) -> None:
        """Make sure the lane's loop runs while it has waiting jobs."""
        loop = self._loops.get(provider)
        if loop is None or loop.done():
            self._loops[provider] = asyncio.ensure_future(self._serve(provider))

    def wake_all(self) -> None:
        for provider, jobs in list(self._worker.book.waiting.items()):
            if jobs:
                self.wake(provider)

    async def stop(self) -> None:
        loops = list(self._loops.values())
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    async def _serve(self, provider: str) -> None:
        """Start the lane's waiting jobs, oldest first, as the provider's limits and the worker's
        slots allow; ends when none waits."""
        worker = self._worker
        endpoint = worker.settings.provider_endpoints.get(provider)
        limits: ProviderLimits | None = worker.caller.limits_for(endpoint) if endpoint is not None else None
        if limits is not None and not limits.limited:
            limits = None  # limited when its jobs were recorded, not in this worker: slots alone pace them
        try:
            while worker.book.waiting.get(provider) and not worker.runner.stopping:
                first = await limits.claim() if limits is not None else None
                if not await worker.runner.wait_for_slot():
                    if first is not None:
                        first.release()
                    return
                claims = [first]
                heads = list(itertools.islice(worker.book.waiting.get(provider, ()), START_BATCH))
                # More at once while the provider and the worker both have room (never more than waits).
                while len(claims) < len(heads) and not worker.runner.full:
                    claim = await limits.claim_now() if limits is not None else None
                    if limits is not None and claim is None:
                        break
                    await worker.runner.wait_for_slot()  # free: taken without waiting
                    claims.append(claim)
                started = await self._start(heads[:len(claims)], claims)
                if started == 0:
                    await asyncio.sleep(IDLE_PAUSE)
        except Exception:
            log.exception("lane of %s stopped; it starts again with its next waiting job", provider)

    async def _start(self, job_ids: list[str], claims: list[Claim | None]) -> int:
        """Start the jobs (each with one runner slot, and one claim if the provider is limited);
        what cannot start gives its claim and slot back. Returns how many started."""
        worker, book = self._worker, self._worker.book
        states = [book.get(job_id) for job_id in job_ids]
        locations = [state.request for state in states if state is not None and state.request is not None]
        found = await worker.when_reachable(worker.fetcher.fetch_many, locations) if locations else {}
        started = 0
        for state, claim in zip(states, claims, strict=True):
            raw = found.get(state.request) if found is not None and state is not None and state.request else None
            current = book.get(state.id) if state is not None else None
            if state is None or current != state or not worker.owns(book.partition_of(state.id)):
                pass  # started, or moved to another worker, since
            elif raw is None and found is not None:
                book.put(state.finished(request_gone(state.request_type)))
            elif raw is not None:
                assert state.request is not None
                worker.start(state, JobRequest.from_bytes(raw), state.request, claim)
                started += 1
                continue
            if claim is not None:
                claim.release()
            worker.runner.release_slot()
        return started
