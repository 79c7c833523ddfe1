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
   in a task of its own, and the worker writes the terminal state (``completed`` or ``failed``,
   ``expires_at``) to the table, awaiting Kafka's acknowledgement. The first outcome wins;
   later ones are counted as duplicates.
4. If a rebalance took the job's partition away during the call, the outcome goes to the
   job-events topic instead, and ``apply_job_events`` in the partition's new owner writes it;
   if the worker is stopping, straight to the changelog (see ``record``).
   The table lives in RocksDB (``workers/jobs_table.py``): memory does not grow with the jobs.
5. A maintenance timer sends ``expire`` orders for jobs past ``expires_at`` (the events agent
   deletes them: a tombstone on the changelog) and ``resume`` orders for jobs that are
   ``processing`` in this worker's partitions but run nowhere here (their worker died); the
   events agent re-reads the request from Kafka and starts it again.

Why a job can't be lost or stuck
--------------------------------
- A request event is acked only once Kafka has acknowledged its ``processing`` record
  (``workers/acks.py``), and Faust commits only acked offsets, so a committed request always
  has its ``processing`` record in the changelog. A crash before that commit redelivers the
  request (step 2 again).
- A crash after it leaves the job ``processing`` in the changelog; whichever worker owns the
  partition next recovers the table and resumes the job (step 5), reading the request again
  from its recorded offset.
- An outcome's changelog write is sent again until Kafka acknowledges it (the runner holds the
  call's slot meanwhile); a crash before that resumes the job instead.
- Acks are in offset order per partition (``workers/acks.py``), which avoids Faust's
  out-of-order commit bug (faust-streaming #606) that agent ``concurrency > 1`` triggers.
- Agents catch every error per event: Faust would otherwise ack a failed event silently. A
  request that cannot be taken for any reason but being unparsable is tried again, not acked.
- Once the worker is stopping, the agents neither apply nor ack what the streams still deliver
  (Faust has revoked the tables by then); the partition's next owner does.
- The request agent never awaits a provider call, so rebalances are not held up by slow calls
  (``stream_wait_empty`` is off).
- On SIGTERM the worker stops taking jobs, lets calls in flight finish for
  ``worker_shutdown_grace_seconds`` (their outcomes written to the changelog), then leaves;
  what did not finish is resumed (step 5).

What can happen twice: a provider call in flight when its worker dies is made again by the
next owner; so is one in flight when a rebalance moves its partition (a worker joins or leaves)
and the call outlasts the new owner's first maintenance tick, since the new owner cannot tell a
call still running elsewhere from one whose worker died. Every such restart is counted
(``possible_duplicate_calls`` on ``/health`` and in ``/metrics``), and the job's ``attempts``
says how many workers started it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import httpx
import mode
from aiokafka.errors import KafkaError
from faust.types import TP
from pydantic import ValidationError

from app.faust_app import create_app
from app.jobs import JobEvent, JobRequest, JobState, JobStatus, Outcome, RequestLocation, RequestType, utcnow
from app.metrics import WorkerMetrics, WorkerSnapshot
from app.retry import Backoff
from app.settings import Settings
from app.topics import (
    JOBS_TABLE,
    changelog_topic_config,
    dead_letter_topic,
    dead_letter_topic_config,
    events_topic_config,
    job_events_topic,
    partition_for,
    request_topic,
    request_topic_config,
    request_topics,
)
from workers.acks import OrderedAcks
from workers.caller import ProviderCaller, service_error
from workers.expiry import ExpiryIndex
from workers.jobs_table import JobsTable
from workers.request_fetcher import RequestFetcher, RequestGone
from workers.runner import JobRunner
from workers.transport import FerryTransport

log = logging.getLogger(__name__)

DROP = object()  # _take_request: leave the event unacked
RANGE_CHUNK = 500  # records read from Kafka at once when taking what the stream skipped
# Records one catch-up order takes at most: it runs in the events agent, which applies nothing
# else meanwhile; the next maintenance tick orders more if the stream is still behind.
CATCH_UP_LIMIT = 2000


def _gap_before(next_offsets: dict, message) -> int | None:
    """Where the records the stream skipped before ``message`` start (None: no gap), noting
    that its partition continues after it. Ferry's request and event offsets have no gaps."""
    expected = next_offsets.get(message.tp)
    # Never backwards: a record below it was taken already (the catch-up may have run ahead).
    next_offsets[message.tp] = max(message.offset + 1, expected or 0)
    return expected if expected is not None and message.offset > expected else None


def _partition_keys(partitions: int) -> dict[int, str]:
    keys: dict[int, str] = {}
    n = 0
    while len(keys) < partitions:
        keys.setdefault(partition_for(f"partition-{n}", partitions), f"partition-{n}")
        n += 1
    return keys


class FerryWorker:
    """The Faust app with Ferry's table, topics, agents and timer, and the resources they share."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None,
                 **app_overrides) -> None:
        self.settings = settings
        partitions = settings.topic_partitions
        # The store is set on the app: a table's own store="rocksdb://" is ignored by Faust 0.15.3
        # (a yarl URL without host or path is falsy, so it falls back to the app's).
        self.app = app = create_app(settings, stream_wait_empty=False, Table=JobsTable,
                                    store=f"{settings.worker_table_store}://", **app_overrides)
        app.transport = FerryTransport(app.conf.broker_consumer, app)  # see workers/transport.py
        self.table = app.Table(
            JOBS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,  # raw: our JSON
            extra_topic_configs={k: v for k, v in changelog_topic_config(settings).items() if k != "cleanup.policy"},
        )
        self.requests = app.topic(*request_topics(settings), key_serializer="raw", value_serializer="raw",
                                  partitions=partitions, config=request_topic_config(settings))
        self.events = app.topic(job_events_topic(settings), key_serializer="raw", value_serializer="raw",
                                partitions=partitions, config=events_topic_config(settings))
        self.dead_letters = app.topic(dead_letter_topic(settings), key_serializer="raw", value_serializer="raw",
                                      partitions=partitions, config=dead_letter_topic_config(settings))
        self.metrics = WorkerMetrics(settings.provider_endpoints)
        self.metrics.watch(self._metrics_snapshot)
        self.caller = ProviderCaller(settings, transport, metrics=self.metrics)
        self.fetcher = RequestFetcher(settings)
        self.runner = JobRunner(self.caller, self.record, settings.worker_max_in_flight, metrics=self.metrics)
        self.acks = OrderedAcks()
        self._next_offset: dict[TP, int] = {}  # per request partition: the next offset to take
        # Per request partition: offsets below this were taken by a catch-up, their writes
        # acknowledged; the stream delivering them later has nothing to do but ack them.
        self._taken_below: dict[TP, int] = {}
        self._next_event_offset: dict[TP, int] = {}  # per job-events partition: the next to apply
        self._last_progress: dict[TP, float] = {}  # per request partition: when it last moved
        self._catch_up_after = max(5.0, 3 * settings.worker_maintenance_interval_seconds)
        # A key that lands in each partition, for orders about a partition rather than a job.
        self._partition_keys = _partition_keys(partitions)
        # Per partition: set once the events agent has applied the job events that were already
        # in Kafka at assignment, so that no job is started again whose outcome is on its way.
        self._events_applied: dict[int, asyncio.Event] = {}
        self._events_backlog_end: dict[int, int] = {}
        self._events_locks: dict[int, asyncio.Lock] = {}
        # Outcomes sent to the job-events topic (their partition moved away during the call) and
        # not applied here yet: their jobs are not to be resumed meanwhile.
        self._outcomes_in_transit: set[str] = set()
        # The state each call in flight was started with: its outcome can be written without
        # the table (see record).
        self._running: dict[str, JobState] = {}
        # Set once _on_assigned has noted where the assignment's partitions start and which
        # job-events backlogs are still to be applied. Faust starts the table's recovery before it
        # calls _on_assigned, so recovery (and the maintenance timer after it) can finish first:
        # until this is set, no job is resumed (its outcome may be in that backlog).
        self._assignment_noted = asyncio.Event()
        self.duplicate_outcomes = 0  # outcomes that arrived for a job already terminal
        self.possible_duplicate_calls = 0  # starts of a job that an earlier worker had started
        self.poisoned_jobs = 0
        # What the maintenance timer looks at, kept beside the table so it never scans it.
        self._expiries = ExpiryIndex()
        self._processing: set[str] = set()

        app.agent(self.requests, name="take_requests")(self._take_requests)
        app.agent(self.events, name="apply_job_events")(self._apply_job_events)
        app.timer(settings.worker_maintenance_interval_seconds, name="maintenance")(self._maintain)
        self.table.on_recover(self._index_table)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_before_shutdown.connect(self._on_shutdown)
        app.page("/health")(self._health)
        app.page("/health/ready")(self._ready)
        app.page("/metrics")(self._metrics_page)
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

    def _metrics_snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(jobs_in_flight=len(self.runner.in_flight),
                              possible_duplicate_calls=self.possible_duplicate_calls,
                              duplicate_outcomes=self.duplicate_outcomes, dead_lettered_jobs=self.poisoned_jobs,
                              consumer_lag=self._consumer_lag())

    def _consumer_lag(self) -> dict[RequestType, int]:
        """Per request type, the requests of this worker's assigned partitions that it has not
        taken: each partition's log end (as of the consumer's last fetch) minus the offset the
        group committed there (Faust's record of it: 0.15.3 keeps it in ``_committed_offset``,
        read from Kafka at assignment and updated at each commit). Read from memory, so that a
        scrape costs no Kafka request; a partition not fetched yet counts 0."""
        types = {request_topic(self.settings, request_type): request_type for request_type in RequestType}
        lag: dict[RequestType, int] = {}
        try:
            consumer = self.app.consumer
            committed_offsets = consumer._committed_offset
            end_offsets = self.app.monitor.tp_end_offsets
            for tp in consumer.assignment():
                request_type = types.get(tp.topic)
                if request_type is None:
                    continue
                end = end_offsets.get(tp)
                committed = committed_offsets.get(tp) or 0  # none yet: the group starts at the log's start
                if end is not None:
                    lag[request_type] = lag.get(request_type, 0) + max(0, end - committed)
        except Exception as exc:  # a scrape while the consumer starts or stops: no lag to report
            log.debug("consumer lag not available: %s", type(exc).__name__)
        return lag

    async def _metrics_page(self, request):
        body, content_type = self.metrics.render()
        return self.app.web.bytes(body, headers={"Content-Type": content_type})

    # Faust calls a page's function with the request alone when it is a bound method.
    async def _health(self, request):
        return self.app.web.json({"status": "ok", **self.counters()})

    async def _ready(self, request):
        """Ready when the worker is in its group with a settled assignment and is not stopping."""
        ready = not self.app.rebalancing and not self.runner.stopping and self.app.consumer is not None \
            and self.app.tables.recovery.completed.is_set()
        return self.app.web.json({"status": "ok" if ready else "unavailable"}, status=200 if ready else 503)

    # -- table access -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobState | None:
        raw = self.table.data.get(job_id.encode())  # the store itself: one lookup, not two
        return JobState.from_bytes(raw) if raw is not None else None

    def _put(self, state: JobState) -> None:
        """Write a job's state to the table (and so to its changelog), from any task."""
        self.table[state.id.encode()] = state.to_bytes()
        self._track(state)

    def _track(self, state: JobState) -> None:
        if state.status is JobStatus.processing:
            self._processing.add(state.id)
        else:
            self._processing.discard(state.id)
        if state.expires_at is not None:
            self._expiries.add(state.expires_at, state.id)

    def _owns(self, partition: int) -> bool:
        """Whether this worker may write the partition's jobs: assigned, recovered, and not
        stopping (Faust stops the tables before the calls in flight are drained)."""
        return not (self.app.should_stop or self.app.rebalancing) and partition in self._owned_partitions()

    def _busy_with(self, job_id: str) -> bool:
        """Whether this worker runs the job, or ran it and its outcome is not applied yet."""
        return job_id in self.runner.in_flight or job_id in self._outcomes_in_transit

    async def record(self, event: JobEvent) -> None:
        """Record a call's outcome or retry report (the runner's ``report``).

        - This worker owns the job's partition: written to the table.
        - It is stopping (SIGTERM, calls in flight drained): Faust has already revoked the tables
          and stopped fetching, and an outcome sent to job events then was seen committed past
          unread (how Faust acked it is inferred, not proven). The finished state goes straight
          to the changelog instead; the next owner recovers it from there.
        - A rebalance moved the partition away during the call: through the job-events topic,
          which the partition's new owner applies.
        """
        partition = partition_for(event.id, self.settings.topic_partitions)
        started = self._running.pop(event.id, None) if event.kind == "outcome" else None
        state = self.get(event.id) if self._owns(partition) else None
        if state is None and self.app.should_stop and started is not None:
            key = event.id.encode()
            await self.table.send_changelog(partition, key, started.finished(event.outcome).to_bytes())
            return
        if state is None:  # not owned, or expired meanwhile: the owner decides
            if event.kind == "outcome":
                self._outcomes_in_transit.add(event.id)
            await self.send_event(event)
            return
        self.table.last_write = None
        self._apply_report(event, state)
        if event.kind == "outcome" and self.table.last_write is not None:
            await self._until_acknowledged(event.id.encode(), partition, self.table.last_write)

    async def _until_acknowledged(self, key: bytes, partition: int, write: asyncio.Future) -> None:
        """Await a changelog write, sending the key's current value again while Kafka refuses it:
        the table already holds it, so nothing else would ever write it to Kafka. Raises if the
        partition is no longer this worker's: the caller then reports through job events."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await asyncio.shield(write)
                return
            except Exception as exc:
                delay = backoff.next_delay()
                log.warning("changelog write of %s failed (%s); again in %.1f s", key, type(exc).__name__, delay)
                if not self._owns(partition):
                    raise
            await asyncio.sleep(delay)
            value = self.table.data.get(key)
            if value is None:
                return  # expired and deleted since
            if not self._owns(partition):
                raise RuntimeError(f"partition {partition} moved away before the write of {key!r} was acknowledged")
            write = self.table.send_changelog(partition, key, value)

    async def send_event(self, event: JobEvent) -> None:
        partition = partition_for(event.id, self.settings.topic_partitions)
        sent = await self.events.send(key=event.id.encode(), value=event.to_bytes(), partition=partition)
        await sent  # acknowledged by Kafka (acks=all)

    # -- agents --------------------------------------------------------------------------------

    async def _take_requests(self, stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            if self.app.should_stop:
                continue  # see _apply_job_events: left unacked, taken by the next owner
            write = await self._take_request_until_done(event)
            if write is not DROP:
                self.acks.ack_after(event, write)

    async def _take_request_until_done(self, event: faust.EventT):
        """_take_request, tried again after an unexpected error: acking a request that was not
        taken would lose its job. Only a request that cannot be parsed is acked untaken."""
        while True:
            try:
                return await self._take_request(event)
            except ValidationError:
                log.exception("request at %s offset %s is unreadable; skipped", event.message.tp, event.message.offset)
                return None  # it never will be readable: do not block its partition
            except Exception:
                if self.runner.stopping:
                    return DROP  # e.g. the fetcher closed under a read: the next owner takes it
                log.exception("request at %s offset %s could not be taken; trying again",
                              event.message.tp, event.message.offset)
                await asyncio.sleep(1.0)

    async def _take_request(self, event: faust.EventT):
        """Start the job of one request event.

        Returns the changelog write to await before acking the event, None to ack it at once,
        or DROP to leave it unacked (its partition was revoked: the new owner reads it).
        """
        message = event.message
        if message.offset < self._taken_below.get(message.tp, 0):
            self._last_progress[message.tp] = time.monotonic()
            return None  # a catch-up took it, and its write is acknowledged
        if await self._take_skipped(event) is DROP:
            return DROP  # stopping before the gap was taken: acking this event would commit past it
        return await self._take(JobRequest.from_bytes(event.value), message)

    async def _take_skipped(self, event: faust.EventT):
        """Take the requests Faust skipped before this event in its partition, if any.

        Faust drops (and acks) records it fetched while its flow control was paused or under an
        older generation, and relies on seeking back; we have seen the first record of a
        partition lost that way. Request offsets have no gaps, so any offset between where this
        assignment started (or the last event taken) and this event was skipped: read it again
        and take it here, inside this event's iteration (same partition, same table partition).
        """
        message = event.message
        self._last_progress[message.tp] = time.monotonic()
        expected = _gap_before(self._next_offset, message)
        if expected is None:
            return None
        log.warning("%s: offsets %d..%d were skipped by the stream; taking them now",
                    message.tp, expected, message.offset - 1)
        return await self._take_range(message.tp, expected, message.offset)

    async def _take_range(self, tp: TP, start: int, end: int, wait_events: bool = True):
        """Read offsets [start, end) of a request partition from Kafka and take each request.

        Returns None once the table writes of the whole range are acknowledged (awaited a chunk
        at a time: a range can be a backlog of many thousands), or DROP if the worker began stopping
        or a write failed before that (then nothing past ``start`` may be committed by this
        worker; the range is taken again, here or by the partition's next owner).
        """
        for first in range(start, end, RANGE_CHUNK):
            writes = []
            last = min(end, first + RANGE_CHUNK)
            # Kafka being slow or away is retried: skipping the records would lose their jobs.
            records = await self._when_reachable(self.fetcher.fetch_values, tp.topic, tp.partition, first, last)
            if records is None:
                return DROP
            for offset, value in records:
                location = RequestLocation(topic=tp.topic, partition=tp.partition, offset=offset)
                try:
                    request = JobRequest.from_bytes(value)
                except ValidationError:
                    log.exception("request at %s offset %d is unreadable; skipped", tp, offset)
                    continue
                write = await self._take(request, location, wait_events)
                if write is DROP:
                    return DROP
                if write is not None:
                    writes.append(write)
            try:
                await asyncio.gather(*writes)
            except Exception as exc:
                log.error("%s: a table write failed (%s); offsets from %d will be taken again", tp, exc, start)
                return DROP
            self._taken_below[tp] = max(self._taken_below.get(tp, 0), last)
        return None

    def _stalled_request_partitions(self) -> set[int]:
        """Partitions whose request stream has taken nothing for a while although slots are free.

        The stream can skip the last records of a partition too (see _take_skipped), and then
        no later event comes to reveal the gap; the maintenance timer orders a catch-up.
        """
        if self.runner.full or self.app.rebalancing:
            return set()
        now = time.monotonic()
        return {tp.partition for tp in self._next_offset
                if now - self._last_progress.get(tp, now) > self._catch_up_after}

    async def _catch_up(self, partition: int) -> None:
        """Take what the request stream has not delivered of this partition (events agent)."""
        tps = [tp for tp in self._next_offset if tp.partition == partition]
        if not tps:
            return
        await self._apply_events_backlog(partition)  # run by the events agent, which holds the lock
        ends = await self.fetcher.end_offsets(tps)
        for tp in tps:
            start = self._next_offset[tp]
            end = min(ends[tp], start + CATCH_UP_LIMIT)
            self._last_progress[tp] = time.monotonic()
            if start < end:
                log.warning("%s: offsets %d..%d were not delivered by the stream; taking them now",
                            tp, start, end - 1)
                self._next_offset[tp] = end
                taken = DROP
                try:
                    taken = await self._take_range(tp, start, end, wait_events=False)
                finally:
                    if taken is DROP:  # stopping, or failed: what was not taken is taken again
                        self._next_offset[tp] = max(start, self._taken_below.get(tp, 0))
                if taken is DROP:
                    return

    async def _take(self, request: JobRequest, where, wait_events: bool = True):
        """Start a job from its request (``where``: its message or location); see _take_request."""
        if wait_events:
            await self._wait_events_applied(where.partition)
        state = self.get(request.id)
        if (state is not None and state.status.is_terminal) or self._busy_with(request.id):
            return None
        location = RequestLocation(topic=where.topic, partition=where.partition, offset=where.offset)
        state = state or JobState.pending(request)
        if state.attempts >= self.settings.job_max_attempts:
            await self._give_up(state, request, location)
            return self.table.last_write
        if not await self.runner.wait_for_slot():
            return DROP  # stopping: the agent acks nothing from here on
        if self._busy_with(request.id):  # taken by the other agent while this one waited
            self.runner.release_slot()
            return None
        # If the partition was revoked while this event waited for a slot, the job is started
        # anyway: leaving an event unacked while later ones are acked lets Faust commit past
        # it (see workers/acks.py), and the new owner at worst repeats the call.
        self._start(state.processing(location), request)
        return self.table.last_write

    def _start(self, state: JobState, request: JobRequest) -> None:
        if state.attempts > 1:
            self.possible_duplicate_calls += 1
            log.info("job %s: starting again (attempt %d)", state.id, state.attempts)
        self._put(state)
        self._running[state.id] = state
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
        # Acked like requests, once their table write is in Kafka: a lost terminal write would
        # make the next owner call the provider again.
        async for event in stream.noack().events():
            if self.app.should_stop:
                # Faust revokes the tables as it starts stopping, while the streams still deliver
                # what was fetched: applying (and acking) an outcome to a revoked table would drop
                # it. Left unacked, the event is applied by the partition's next owner.
                continue
            self.table.last_write = None
            message = event.message
            async with self._events_lock(message.partition):
                expected = self._next_event_offset.get(message.tp)
                if expected is None or message.offset >= expected:  # else applied already, read directly
                    for value, offset in [*await self._skipped_events(message), (event.value, message.offset)]:
                        await self._apply_value(value, message.tp, offset)
            self.acks.ack_after(event, self.table.last_write)
            partition = event.message.partition
            if event.message.offset + 1 >= self._events_backlog_end.get(partition, 0):
                self._events_ready(partition).set()

    async def _skipped_events(self, message) -> list[tuple[bytes, int]]:
        """The job events Faust's stream skipped before this one in its partition, read again.

        The events stream drops records at the start of an assignment just as the request stream
        does (see _take_skipped); a dropped outcome would leave its job to be called again, a
        dropped retry report would hide that the job is retrying. Event offsets have no gaps.
        """
        expected = _gap_before(self._next_event_offset, message)
        if expected is None:
            return []
        log.warning("%s: job events %d..%d were skipped by the stream; applying them now",
                    message.tp, expected, message.offset - 1)
        records = await self._when_reachable(self.fetcher.fetch_values, message.tp.topic, message.tp.partition,
                                             expected, message.offset)
        return [(value, offset) for offset, value in records or []]

    async def _apply_value(self, value: bytes, tp, offset: int, backlog: bool = False) -> None:
        try:
            event = JobEvent.from_bytes(value)
            if backlog and event.kind == "catch_up":
                return  # an old order: catching up starts by applying this very backlog
            await self._apply(event)
        except Exception:
            log.exception("job event at %s offset %s could not be applied", tp, offset)

    def _events_lock(self, partition: int) -> asyncio.Lock:
        """Held while job events of a partition are applied, by the events agent or by
        _wait_events_applied, so that each event is applied once and in order."""
        if partition not in self._events_locks:
            self._events_locks[partition] = asyncio.Lock()
        return self._events_locks[partition]

    async def _wait_events_applied(self, partition: int) -> None:
        """Apply the job events that were in Kafka when the partition was assigned, before a
        request of the partition is taken (so no job is started whose outcome is on its way).

        They are read from Kafka here rather than awaited from the events stream, which may
        skip them or deliver them late (see _take_skipped).
        """
        if self._events_ready(partition).is_set():
            return
        async with self._events_lock(partition):
            await self._apply_events_backlog(partition)

    async def _apply_events_backlog(self, partition: int) -> None:
        """The work of _wait_events_applied; the caller holds the partition's events lock."""
        ready = self._events_ready(partition)
        if ready.is_set():
            return
        tp = TP(job_events_topic(self.settings), partition)
        start, end = self._next_event_offset.get(tp), self._events_backlog_end.get(partition)
        if start is not None and end is not None and start < end:
            records = await self._when_reachable(self.fetcher.fetch_values, tp.topic, partition, start, end)
            if records is None:
                return  # stopping
            for offset, value in records:
                await self._apply_value(value, tp, offset, backlog=True)
            self._next_event_offset[tp] = max(self._next_event_offset.get(tp, 0), end)
        ready.set()

    def _events_ready(self, partition: int) -> asyncio.Event:
        if partition not in self._events_applied:
            self._events_applied[partition] = asyncio.Event()
            self._events_applied[partition].set()
        return self._events_applied[partition]

    async def _apply(self, event: JobEvent) -> None:
        state = self.get(event.id)
        if event.kind == "catch_up":
            await self._catch_up(partition_for(event.id, self.settings.topic_partitions))
        elif event.kind in ("outcome", "retrying"):
            if event.kind == "outcome":
                self._outcomes_in_transit.discard(event.id)
            self._apply_report(event, state)
        elif event.kind == "expire":
            if state is not None and state.is_expired():
                del self.table[event.id.encode()]
        elif event.kind == "resume":
            # Only if nobody started the job since the order was given: orders repeat every tick.
            if (state is not None and state.status is JobStatus.processing and state.attempts == event.attempts
                    and not self._busy_with(event.id)):
                await self._resume(state)

    def _apply_report(self, event: JobEvent, state: JobState | None) -> None:
        """Write an outcome or a retry report to the table (no await: one step on the loop)."""
        if state is None:
            return  # expired and deleted, or never known: nothing to finish
        if event.kind == "retrying":
            if state.status is JobStatus.processing:
                self._put(state.retrying(event.retry))
        elif state.status.is_terminal:
            self.duplicate_outcomes += 1
        else:
            self._put(state.finished(event.outcome))

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
        for raw in list(self.table.values()):
            state = JobState.from_bytes(raw)
            if partition_for(state.id, self.settings.topic_partitions) in owned:
                self._track(state)

    async def _on_revoked(self, sender, revoked: set[TP], **kwargs) -> None:
        # The table's writes skip Faust's producer buffer, which Faust has just flushed: the
        # partitions' next owners recover from the changelog, so it must hold our writes too.
        if not await self.table.flush_writes(timeout=self.settings.kafka_session_timeout_seconds / 2):
            log.warning("table writes not acknowledged before the rebalance went on; the next owner "
                        "resumes the jobs whose state it does not see")
        self._processing.clear()  # rebuilt by _index_table once the new assignment recovers
        self._assignment_noted.clear()  # no resume until the next assignment is noted
        self.acks.forget(revoked)
        self._next_offset.clear()
        self._taken_below.clear()
        self._next_event_offset.clear()
        self._last_progress.clear()
        self._outcomes_in_transit.clear()

    async def _on_assigned(self, sender, assigned: set[TP], **kwargs) -> None:
        """Note where each request partition starts, to see what the stream skips."""
        try:
            await self._note_assignment(assigned)
        finally:
            self._assignment_noted.set()

    async def _note_assignment(self, assigned: set[TP]) -> None:
        if self.runner.stopping:
            return  # a stopping worker takes nothing more; its fetcher may already be closed
        names = set(request_topics(self.settings))
        partitions = [tp for tp in assigned if tp.topic in names]
        events = [tp for tp in assigned if tp.topic == job_events_topic(self.settings)]
        if partitions:
            starts = await self._when_reachable(self.fetcher.start_offsets, self.settings.app_id, partitions)
            if starts is None:
                return
            self._next_offset.update({TP(tp.topic, tp.partition): offset for tp, offset in starts.items()})
            now = time.monotonic()
            self._last_progress.update({TP(tp.topic, tp.partition): now for tp in partitions})
        if events:
            starts = await self._when_reachable(self.fetcher.start_offsets, self.settings.app_id, events)
            ends = await self._when_reachable(self.fetcher.end_offsets, events)
            if starts is None or ends is None:
                return
            self._next_event_offset.update({TP(tp.topic, tp.partition): offset for tp, offset in starts.items()})
            for tp in events:
                ready = self._events_ready(tp.partition)
                self._events_backlog_end[tp.partition] = ends[tp]
                if starts[tp] < ends[tp]:
                    ready.clear()

    async def _when_reachable(self, lookup, *args):
        """A Kafka read retried while Kafka is away or slow (a rebalance must not fail on an
        outage: Faust would give up the assignment; a skipped record must not be passed over);
        None if the worker stops meanwhile. Other errors (a record gone or unreadable) raise."""
        while not self.runner.stopping:
            try:
                return await lookup(*args)
            except (TimeoutError, KafkaError) as exc:
                log.warning("Kafka read failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)
        return None

    async def _maintain(self) -> None:
        if self.app.rebalancing or not self._assignment_noted.is_set():
            return
        now = utcnow()
        orders = [JobEvent(id=job_id, kind="expire") for job_id in self._expiries.pop_due(now)]
        for job_id in self._processing - self.runner.in_flight.keys() - self._outcomes_in_transit:
            if not self._events_ready(partition_for(job_id, self.settings.topic_partitions)).is_set():
                continue
            state = self.get(job_id)
            if state is not None and state.status is JobStatus.processing:
                orders.append(JobEvent(id=job_id, kind="resume", attempts=state.attempts))
        for partition in self._stalled_request_partitions():
            orders.append(JobEvent(id=self._partition_keys[partition], kind="catch_up"))
        await asyncio.gather(*(self.send_event(order) for order in orders))
