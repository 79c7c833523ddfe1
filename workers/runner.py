"""Running provider calls outside the agents' streams, and reporting how they went.

An agent that awaited each provider call would hold its partition for minutes and stall every
rebalance; an agent with ``concurrency > 1`` may commit past messages still in flight. So the
request agent stays sequential and quick: it records ``processing`` in the table, hands the
call to this runner, and moves on. The runner:

- bounds the calls in flight (``worker_max_in_flight``); the agent waits for a slot before
  taking a job, so excess jobs wait in Kafka, not in memory (a limited provider's excess
  waits in its lane, ``workers/lanes.py``, holding no slot). A job holds its slot for its
  calls, at most ``job_deadline_seconds`` (the caller's bound), then while its outcome is
  delivered;
- runs each call as a task and hands its ``Outcome`` to ``report`` (the worker records it in
  the jobs table), retrying until that succeeds: a lost outcome would mean a second call;
- reports each provider retry the same way, so a poll shows why the job waits;
- on shutdown, stops handing out slots and lets the calls in flight finish, up to a deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.jobs import JobEvent, JobRequest, Outcome, RetryInfo, utcnow
from app.metrics import WorkerMetrics
from app.retry import Backoff
from workers.caller import ProviderCaller, service_error
from workers.limits import Claim

log = logging.getLogger(__name__)

Report = Callable[[JobEvent], Awaitable[None]]


class Stopping(Exception):
    """The worker is stopping: no more calls start, and what was not taken is left unacked."""


class JobRunner:
    def __init__(self, caller: ProviderCaller, report: Report, max_in_flight: int,
                 metrics: WorkerMetrics | None = None) -> None:
        self._caller = caller
        self._metrics = metrics or WorkerMetrics()
        self._report = report
        self._slots = asyncio.Semaphore(max_in_flight)
        self._stopping = asyncio.Event()
        self.in_flight: dict[str, asyncio.Task] = {}

    @property
    def full(self) -> bool:
        return self._slots.locked()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_for_slot(self) -> bool:
        """Wait until another call may start; False once the runner is stopping.

        On True, pair with ``launch`` or ``release_slot``.
        """
        if self.stopping:
            return False
        if not self._slots.locked():
            await self._slots.acquire()  # free: taken at once, without the two waiters below
            return True
        acquire = asyncio.ensure_future(self._slots.acquire())
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if acquire.done() and not acquire.cancelled():
            if not self.stopping:
                return True
            self._slots.release()
        else:
            acquire.cancel()
        return False

    def release_slot(self) -> None:
        self._slots.release()

    def launch(self, request: JobRequest, after: asyncio.Future | None = None, claim: Claim | None = None) -> None:
        """Start the job's provider call, once ``after`` (its ``processing`` write) is done; a slot
        must have been taken with ``wait_for_slot``. ``claim``: its lane's place at the provider's
        limits, for the first call (released if unused)."""
        self.in_flight[request.id] = asyncio.create_task(self._run(request, after, claim), name=f"job-{request.id}")

    async def _run(self, request: JobRequest, after: asyncio.Future | None, claim: Claim | None) -> None:
        self._metrics.queue_wait.labels(request.request_type.value).observe(
            max(0.0, (utcnow() - request.created_at).total_seconds()))
        try:
            if after is not None:
                # The attempt is counted in Kafka before the call: a job whose call kills its
                # worker at once (poison) is still abandoned after job_max_attempts calls.
                await asyncio.wait([after])
            try:
                outcome = await self._caller.run(request, on_retry=lambda retry: self._report_retry(request, retry),
                                                 claim=claim)
            except Exception:
                log.exception("job %s: unexpected error calling the provider", request.id)
                error = service_error(500, "internal error while calling the provider", "internal_error",
                                      None, request.request_type)
                outcome = Outcome(status_code=500, error=error)
            self._count(request, outcome)
            await self._deliver(JobEvent(id=request.id, kind="outcome", outcome=outcome))
        finally:
            if claim is not None:
                claim.release()  # cancelled before its call
            self.in_flight.pop(request.id, None)
            self._slots.release()

    def _count(self, request: JobRequest, outcome: Outcome) -> None:
        """Count the job's outcome under the provider that answered last, and time it from its submit."""
        metrics, request_type = self._metrics, request.request_type.value
        extra = outcome.error.extra_fields if outcome.error is not None else (outcome.result or {}).get("extra_fields")
        provider = metrics.provider(extra.get("provider") if isinstance(extra, dict) else None)
        (metrics.jobs_completed if outcome.error is None else metrics.jobs_failed).labels(request_type, provider).inc()
        metrics.job_duration.labels(request_type, "completed" if outcome.error is None else "failed").observe(
            max(0.0, (utcnow() - request.created_at).total_seconds()))

    async def _report_retry(self, request: JobRequest, retry: RetryInfo) -> None:
        # Informational: a report that Kafka cannot take at once is dropped, the retry goes on.
        try:
            async with asyncio.timeout(2.0):
                await self._report(JobEvent(id=request.id, kind="retrying", retry=retry))
        except Exception as exc:
            log.info("job %s: retry report not delivered (%s)", request.id, type(exc).__name__)

    async def _deliver(self, event: JobEvent) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self._report(event)
                return
            except Exception as exc:  # the broker is away: the outcome must still get through
                delay = backoff.next_delay()
                log.warning("job %s: outcome not delivered yet (%s); retrying in %.1f s",
                            event.id, type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def drain(self, grace_seconds: float) -> None:
        """Start no more calls; wait up to ``grace_seconds`` for those in flight, then cancel them.

        A cancelled call's job stays ``processing``; the partition's next owner resumes it.
        """
        self._stopping.set()
        tasks = list(self.in_flight.values())
        if tasks:
            log.info("draining %d calls in flight (up to %.0f s)", len(tasks), grace_seconds)
            _, unfinished = await asyncio.wait(tasks, timeout=grace_seconds) if grace_seconds > 0 else ((), tasks)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if unfinished:
                log.warning("%d calls did not finish in time; their jobs will be resumed", len(unfinished))
