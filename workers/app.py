"""The worker: Faust agents that move jobs from the request topics to a terminal state.

How a job flows
---------------
1. The API writes ``pending`` to the changelog, then the request to its request topic
   (``api/publisher.py``); both are acknowledged before the 202.
2. ``take_requests`` (one sequential agent over all request topics) reads the request. A job
   already terminal in the table, or already running here, is skipped. A job that
   ``job_max_attempts`` workers have already started without finishing is poison: its request
   is copied to the dead-letter topic and it is failed. Otherwise the agent waits for an
   in-flight slot, writes ``processing`` (attempts + 1, and where the request sits) to the
   table, hands the call to the runner, and acks the event.
3. The runner calls the provider (``workers/caller.py``, with retries and per-provider limits)
   in a task of its own and sends the ``Outcome`` to the job-events topic.
4. ``apply_job_events`` writes the terminal state (``completed`` or ``failed``, ``expires_at``)
   to the table. The first outcome wins; later ones are counted as duplicates.
5. A maintenance timer sends ``expire`` orders for jobs past ``expires_at`` (the events agent
   deletes them: a tombstone on the changelog) and ``resume`` orders for jobs that are
   ``processing`` in this worker's partitions but run nowhere here (their worker died); the
   events agent re-reads the request from Kafka and starts it again.

Why a job can't be lost or stuck
--------------------------------
- Faust commits a request's offset only after the agent acked it, and flushes the table's
  changelog writes before committing, so a committed request always has its ``processing``
  record in the changelog. A crash before that commit redelivers the request (step 2 again).
- A crash after it leaves the job ``processing`` in the changelog; whichever worker owns the
  partition next recovers the table and resumes the job (step 5), reading the request again
  from its recorded offset.
- Outcomes travel through Kafka (acks=all) before they touch the table, and the runner retries
  the send until Kafka takes it; a crash in between resumes the job instead.
- Acks are in offset order (one sequential agent acking manually), which avoids Faust's
  out-of-order commit bug (faust-streaming #606) that agent ``concurrency > 1`` triggers.
- Agents catch every error per event: Faust would otherwise ack a failed event silently.
- The request agent never awaits a provider call, so rebalances are not held up by slow calls
  (``stream_wait_empty`` is off); an event whose partition was revoked while it waited for a
  slot is dropped unacked, for the new owner to read.
- On SIGTERM the worker stops taking jobs, lets calls in flight finish for
  ``worker_shutdown_grace_seconds``, then leaves; what did not finish is resumed (step 5).

What can still happen twice: a provider call in flight when its worker dies is made again by
the next owner. Every such restart is counted (``possible_duplicate_calls`` on ``/health``),
and the job's ``attempts`` says how many workers started it.
"""

from __future__ import annotations

import heapq
import logging
from datetime import datetime

import faust
import httpx
import mode
from faust.types import TP

from app.faust_app import create_app
from app.jobs import JobEvent, JobRequest, JobState, JobStatus, Outcome, RequestLocation, utcnow
from app.settings import Settings
from app.topics import (
    JOBS_TABLE, changelog_topic_config, dead_letter_topic, job_events_topic, partition_for, request_topic_config,
    request_topics,
)
from workers.caller import ProviderCaller, service_error
from workers.request_fetcher import RequestFetcher, RequestGone
from workers.runner import JobRunner

log = logging.getLogger(__name__)


class FerryWorker:
    """The Faust app with Ferry's table, topics, agents and timer, and the resources they share."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None,
                 **app_overrides) -> None:
        self.settings = settings
        partitions = settings.topic_partitions
        self.app = app = create_app(settings, stream_wait_empty=False, **app_overrides)
        self.table = app.Table(
            JOBS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,  # raw: our JSON
            extra_topic_configs={k: v for k, v in changelog_topic_config(settings).items() if k != "cleanup.policy"},
        )
        self.requests = app.topic(*request_topics(settings), key_serializer="raw", value_serializer="raw",
                                  partitions=partitions, config=request_topic_config(settings))
        self.events = app.topic(job_events_topic(settings), key_serializer="raw", value_serializer="raw",
                                partitions=partitions, config=request_topic_config(settings))
        self.dead_letters = app.topic(dead_letter_topic(settings), key_serializer="raw", value_serializer="raw",
                                      partitions=partitions, config=request_topic_config(settings))
        self.caller = ProviderCaller(settings, transport)
        self.fetcher = RequestFetcher(settings)
        self.runner = JobRunner(self.caller, self.send_event, settings.worker_max_in_flight)
        self.duplicate_outcomes = 0  # outcomes that arrived for a job already terminal
        self.possible_duplicate_calls = 0  # starts of a job that an earlier worker had started
        self.poisoned_jobs = 0
        # What the maintenance timer looks at, kept beside the table so it never scans it.
        self._expiries: list[tuple[datetime, str]] = []
        self._processing: set[str] = set()

        app.agent(self.requests, name="take_requests")(self._take_requests)
        app.agent(self.events, name="apply_job_events")(self._apply_job_events)
        app.timer(settings.worker_maintenance_interval_seconds, name="maintenance")(self._maintain)
        self.table.on_recover(self._index_table)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_before_shutdown.connect(self._on_shutdown)
        app.page("/health")(self._health)
        app.page("/health/ready")(self._ready)
        app.service(self._resources_service())

    # -- lifecycle --------------------------------------------------------------------------

    def _resources_service(self) -> type[mode.Service]:
        worker = self

        class WorkerResources(mode.Service):
            async def on_start(self) -> None:
                await worker.caller.start()
                await worker.fetcher.start()

            async def on_stop(self) -> None:
                await worker.runner.drain(0)  # after the graceful drain, if it ran: cancel the rest
                await worker.caller.stop()
                await worker.fetcher.stop()

        return WorkerResources

    async def _on_shutdown(self, sender, **kwargs) -> None:
        await self.runner.drain(self.settings.worker_shutdown_grace_seconds)

    def counters(self) -> dict[str, int]:
        return {"in_flight": len(self.runner.in_flight), "duplicate_outcomes": self.duplicate_outcomes,
                "possible_duplicate_calls": self.possible_duplicate_calls, "poisoned_jobs": self.poisoned_jobs}

    async def _health(self, web, request):
        return web.json({"status": "ok", **self.counters()})

    async def _ready(self, web, request):
        """Ready when the worker is in its group with a settled assignment and is not stopping."""
        ready = not self.app.rebalancing and not self.runner.stopping and self.app.consumer is not None \
            and self.app.tables.recovery.completed.is_set()
        return web.json({"status": "ok" if ready else "unavailable"}, status=200 if ready else 503)

    # -- table access -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobState | None:
        raw = self.table.get(job_id.encode())
        return JobState.from_bytes(raw) if raw is not None else None

    def _put(self, state: JobState) -> None:
        """Write a job's state; only legal inside an agent's stream iteration."""
        self.table[state.id.encode()] = state.to_bytes()
        self._track(state)

    def _track(self, state: JobState) -> None:
        if state.status is JobStatus.processing:
            self._processing.add(state.id)
        else:
            self._processing.discard(state.id)
        if state.expires_at is not None:
            heapq.heappush(self._expiries, (state.expires_at, state.id))

    async def send_event(self, event: JobEvent) -> None:
        partition = partition_for(event.id, self.settings.topic_partitions)
        sent = await self.events.send(key=event.id.encode(), value=event.to_bytes(), partition=partition)
        await sent  # acknowledged by Kafka (acks=all)

    # -- agents --------------------------------------------------------------------------------

    def _still_owned(self, event: faust.EventT) -> bool:
        message = event.message
        return (message.generation_id == self.app.consumer_generation_id
                and message.tp in self.app.consumer.assignment())

    async def _take_requests(self, stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            try:
                take = await self._take_request(event)
            except Exception:
                log.exception("request at %s offset %s could not be taken", event.message.tp, event.message.offset)
                take = True  # a request that cannot be read never will be: do not block its partition
            if take:
                event.ack()

    async def _take_request(self, event: faust.EventT) -> bool:
        """Start the job of one request event; False if the event must stay unacked."""
        request = JobRequest.from_bytes(event.value)
        state = self.get(request.id)
        if (state is not None and state.status.is_terminal) or request.id in self.runner.in_flight:
            return True
        message = event.message
        location = RequestLocation(topic=message.topic, partition=message.partition, offset=message.offset)
        state = state or JobState.pending(request)
        if state.attempts >= self.settings.job_max_attempts:
            await self._give_up(state, request, location)
            return True
        if not await self.runner.wait_for_slot():
            return False
        if not self._still_owned(event):
            self.runner.release_slot()
            return False
        self._start(state.processing(location), request)
        return True

    def _start(self, state: JobState, request: JobRequest) -> None:
        if state.attempts > 1:
            self.possible_duplicate_calls += 1
            log.info("job %s: starting again (attempt %d)", state.id, state.attempts)
        self._put(state)
        self.runner.launch(request)

    async def _give_up(self, state: JobState, request: JobRequest, location: RequestLocation) -> None:
        """Fail a poison job, after copying its request to the dead-letter topic."""
        reason = (f"job abandoned after {state.attempts} attempts: each worker that started it "
                  f"stopped before finishing it")
        partition = partition_for(request.id, self.settings.topic_partitions)
        sent = await self.dead_letters.send(
            key=request.id.encode(), value=request.to_bytes(), partition=partition,
            headers={"ferry-reason": reason.encode(), "ferry-source": f"{location.topic}/{location.partition}/"
                     f"{location.offset}".encode()})
        await sent
        self.poisoned_jobs += 1
        log.error("job %s: %s; request copied to %s", request.id, reason, dead_letter_topic(self.settings))
        error = service_error(500, reason, "job_abandoned", request.targets[0], request.request_type)
        self._put(state.finished(Outcome(status_code=500, error=error)))

    async def _apply_job_events(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await self._apply(JobEvent.from_bytes(event.value))
            except Exception:
                log.exception("job event at %s offset %s could not be applied", event.message.tp, event.message.offset)

    async def _apply(self, event: JobEvent) -> None:
        state = self.get(event.id)
        if event.kind == "outcome":
            if state is None:
                return  # expired and deleted, or never known: nothing to finish
            if state.status.is_terminal:
                self.duplicate_outcomes += 1
                return
            self._put(state.finished(event.outcome))
        elif event.kind == "retrying":
            if state is not None and state.status is JobStatus.processing:
                self._put(state.retrying(event.retry))
        elif event.kind == "expire":
            if state is not None and state.is_expired():
                del self.table[event.id.encode()]
        elif event.kind == "resume":
            if state is not None and state.status is JobStatus.processing and event.id not in self.runner.in_flight:
                await self._resume(state)

    async def _resume(self, state: JobState) -> None:
        try:
            request = await self.fetcher.fetch(state.request)
        except RequestGone as exc:
            error = service_error(500, f"the job's request is no longer in Kafka: {exc}", "internal_error",
                                  None, state.request_type)
            self._put(state.finished(Outcome(status_code=500, error=error)))
            return
        if state.attempts >= self.settings.job_max_attempts:
            await self._give_up(state, request, state.request)
        elif await self.runner.wait_for_slot():
            self._start(state.processing(state.request), request)

    # -- maintenance -----------------------------------------------------------------------------

    def _owned_partitions(self) -> set[int]:
        topic = self.table.changelog_topic.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def _index_table(self) -> None:
        """Rebuild the maintenance index from the table after recovery (partitions changed)."""
        self._expiries.clear()
        self._processing.clear()
        owned = self._owned_partitions()
        for key, raw in list(self.table.items()):
            state = JobState.from_bytes(raw)
            if partition_for(state.id, self.settings.topic_partitions) in owned:
                self._track(state)
        heapq.heapify(self._expiries)

    async def _on_revoked(self, sender, revoked: set[TP], **kwargs) -> None:
        self._processing.clear()  # rebuilt by _index_table once the new assignment recovers

    async def _maintain(self) -> None:
        if self.app.rebalancing:
            return
        now = utcnow()
        while self._expiries and self._expiries[0][0] <= now:
            _, job_id = heapq.heappop(self._expiries)
            await self.send_event(JobEvent(id=job_id, kind="expire"))
        for job_id in list(self._processing - self.runner.in_flight.keys()):
            await self.send_event(JobEvent(id=job_id, kind="resume"))
