"""The worker: Faust agents that move jobs from the request topics to a terminal state.

1. The API writes ``pending`` to the changelog, then the request to its request topic.
2. ``take_requests`` (one sequential agent over all request topics) reads the request. A job
   that is not ``pending`` (finished, or started already) or already waits in its provider's
   lane is left alone. A job whose provider is limited and has no room now waits in its lane
   (``workers/lanes.py``): recorded as waiting, started later by the lane. Else the agent waits
   for an in-flight slot, writes ``processing`` (attempts + 1, where the request sits, which
   worker runs it) and hands the call to the runner (``workers/runner.py``). Either way it acks
   the event once Kafka has that write. A request no worker can have taken before starts its
   call at once, its ``processing`` record written only if the call outlasts a moment
   (``workers/quiet_starts.py``): a fast call's outcome is its job's first record.
3. The outcome is written to the table; if a rebalance moved the job's partition away during
   the call, it goes to the job-events topic and ``apply_job_events`` in the new owner writes it.
4. The maintenance timer (``workers/maintenance.py``) deletes expired jobs and resumes orphans.

Why nothing is lost or stuck: a request event is acked only once Kafka has its job's
``processing`` record (or, for a quiet start, its first record), and no commit passes an unacked
event (``workers/faust_layer``), so a committed request always has its job's state in the
changelog; a crash before that commit redelivers the request. A job ``processing`` whose worker
left the group is resumed by the partition's owner, from the request's recorded offset. An
outcome's write is sent again until Kafka acknowledges it, the call's slot held meanwhile.
Agents catch every error per event (Faust would ack a failed event); a request that cannot be
taken, unless unparsable, is tried again. Once the worker is stopping, the agents neither apply
nor ack what the streams still deliver (Faust has revoked the tables): the partition's next
owner does. The request agent never awaits a provider call, so rebalances are not held up by
slow calls.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from typing import cast

import faust
import mode
from faust.types import TP
from pydantic import ValidationError

from app.jobs import JobEvent, JobRequest, JobState, JobStatus, RequestLocation
from app.metrics import WorkerMetrics
from app.retry import Backoff
from app.settings import Settings
from app.topics import (
    JOBS_TABLE,
    changelog_topic_config,
    dead_letter_topic,
    dead_letter_topic_config,
    events_topic_config,
    job_events_topic,
    request_topic_config,
    request_topics,
)
from workers.book import JobBook, PartitionMoved
from workers.caller import ProviderCaller
from workers.faust_layer import FerryTransport, JobsTable, create_app, owned_partitions
from workers.lanes import Lanes
from workers.limits import Claim
from workers.maintenance import Maintenance
from workers.pages import register_pages
from workers.quiet_starts import QuietStarts
from workers.request_fetcher import RequestFetcher, retried_while_unreachable
from workers.runner import JobRunner, Stopping

log = logging.getLogger(__name__)


class FerryWorker:
    """The Faust app with Ferry's table, topics, agents and timer, and the resources they share."""

    def __init__(self, settings: Settings, **app_overrides) -> None:
        self.settings = settings
        # This process's name in the group (a restarted worker is a new one): jobs record who runs them.
        self.id = f"http://{socket.gethostname()}:{settings.worker_web_port}/{uuid.uuid4().hex}"
        # The store is set on the app: Faust 0.15.3 ignores a table's own store="rocksdb://".
        self.app = app = create_app(settings, stream_wait_empty=False, Table=JobsTable, canonical_url=self.id,
                                    store=f"{settings.worker_table_store}://", **app_overrides)
        app.transport = FerryTransport(app.conf.broker_consumer, app)
        partitions = settings.topic_partitions
        changelog_config = {k: v for k, v in changelog_topic_config(settings).items() if k != "cleanup.policy"}
        self.table = cast(JobsTable, app.Table(JOBS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,
                                               extra_topic_configs=changelog_config))
        self.book = JobBook(self.table, partitions)
        raw: dict = dict(key_serializer="raw", value_serializer="raw", partitions=partitions)
        self.requests = app.topic(*request_topics(settings), config=request_topic_config(settings), **raw)
        self.events = app.topic(job_events_topic(settings), config=events_topic_config(settings), **raw)
        self.dead_letters = app.topic(dead_letter_topic(settings), config=dead_letter_topic_config(settings), **raw)
        self.metrics = WorkerMetrics(settings.provider_endpoints)
        self.caller = ProviderCaller(settings, metrics=self.metrics)
        self.fetcher = RequestFetcher(settings)
        self.runner = JobRunner(self.caller, self.record, settings.worker_max_in_flight, metrics=self.metrics)
        self._running: dict[str, JobState] = {}  # each call in flight: the state it was started with
        self.quiet_starts = QuietStarts(settings.worker_processing_record_after_seconds, self._record_start)
        self._request_topics = frozenset(request_topics(settings))
        # Per request partition: its end offset when assigned here. A request at or past it was
        # appended since, so no other worker can have taken it: its call may start quietly.
        self._unseen_from: dict[tuple[str, int], int] = {}
        # Per job-events partition: the end offset at assignment, until the events agent reaches it.
        # No orphan of the partition is resumed before: its outcome may be among those events.
        self._events_backlog: dict[int, int] = {}
        # Outcomes sent through job events, being sent or not applied here yet: not orphans. One
        # whose send began before a rebalance and ended after it is in no assignment's backlog.
        self.in_transit: set[str] = set()
        self._sending: set[str] = set()
        self._owned: tuple[int | None, frozenset[int]] = (None, frozenset())  # per generation
        self._assignment_noted = asyncio.Event()  # Faust may finish recovery before on_assigned
        self._acks: set[asyncio.Task] = set()
        self.duplicate_outcomes = self.possible_duplicate_calls = 0
        self.maintenance = Maintenance(self)
        self.lanes = Lanes(self)

        app.agent(self.requests, name="take_requests")(self._take_requests)
        app.agent(self.events, name="apply_job_events")(self._apply_job_events)
        app.timer(settings.worker_maintenance_interval_seconds, name="maintenance")(self._maintain)
        app.sensors.add(MaintainAfterRebalance(self))
        self.table.on_recover(self._on_recovered)
        # mode types a receiver as taking *args; these take the one argument Faust sends.
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]
        app.on_before_shutdown.connect(self._on_shutdown)  # type: ignore[arg-type]
        app.service(worker_resources(self))
        register_pages(self)

    def counters(self) -> dict[str, int]:
        return {"in_flight": len(self.runner.in_flight), "waiting": sum(self.lanes.waiting().values()),
                "duplicate_outcomes": self.duplicate_outcomes,
                "possible_duplicate_calls": self.possible_duplicate_calls,
                "poisoned_jobs": self.maintenance.poisoned_jobs}

    def get(self, job_id: str) -> JobState | None:
        return self.book.get(job_id)

    # -- lifecycle ------------------------------------------------------------------------------

    async def _on_shutdown(self, sender, **kwargs) -> None:
        await self.runner.drain(self.settings.worker_shutdown_grace_seconds)

    def owned(self) -> frozenset[int]:
        """The partitions whose jobs this worker may write now: assigned, not moving, not stopping."""
        if self.app.should_stop or self.app.rebalancing:
            return frozenset()
        # Read once per assignment (a generation's assignment does not change): Faust builds the
        # set anew on each call, and every outcome and resumed job asks.
        generation = self.app.consumer_generation_id
        if self._owned[0] != generation:
            owned = owned_partitions(self.app, self.table.changelog_topic.get_topic_name())
            self._owned = (generation, frozenset(owned))
        return self._owned[1]

    def owns(self, partition: int) -> bool:
        return partition in self.owned()

    async def _on_recovered(self) -> None:
        self.book.rebuild(owned_partitions(self.app, self.table.changelog_topic.get_topic_name()))
        self.lanes.wake_all()

    async def _on_revoked(self, sender, revoked: set[TP], **kwargs) -> None:
        # The partitions' next owners recover the table from the changelog: it must hold our writes.
        self._unseen_from.clear()
        # The next owner must see the calls running here as processing, not take them again.
        self.quiet_starts.record_all(lambda started: self._record_start(started, revoking=True))
        if not await self.table.flush_writes(timeout=self.settings.kafka_session_timeout_seconds / 2):
            log.warning("table writes not acknowledged before the rebalance went on")
        self.book.forget_assignment()
        self._assignment_noted.clear()
        self._events_backlog.clear()
        self.in_transit.intersection_update(self._sending)  # the rest are in Kafka: in the next backlog

    async def _on_assigned(self, sender, assigned: set[TP], **kwargs) -> None:
        try:
            events = [tp for tp in assigned if tp.topic == job_events_topic(self.settings)]
            requests = [tp for tp in assigned if tp.topic in self._request_topics]
            if (events or requests) and not self.runner.stopping:
                generation = self.app.consumer_generation_id
                ends = await self.when_reachable(self.fetcher.end_offsets, events + requests)
                if ends is not None and generation == self.app.consumer_generation_id:
                    self._unseen_from.update({(tp.topic, tp.partition): ends[tp] for tp in requests})
                starts = await self.when_reachable(self.fetcher.start_offsets, self.settings.app_id, events)
                if starts is not None and ends is not None:
                    self._events_backlog.update({tp.partition: ends[tp] for tp in events if starts[tp] < ends[tp]})
        finally:
            self._assignment_noted.set()
            self.maintain_now()  # if the rebalance ended first (else at its end)

    @property
    def assignment_noted(self) -> bool:
        """Whether the worker has looked up what it needs about its latest assignment (Faust may
        deliver records before: those are handled as if nothing were known)."""
        return self._assignment_noted.is_set()

    def events_pending(self, partition: int) -> bool:
        """Whether job events that were in Kafka at the assignment are still to be applied."""
        return partition in self._events_backlog

    async def when_reachable(self, lookup, *args):
        """``lookup(*args)``, retried while Kafka is away; None if the worker stops meanwhile."""
        return await retried_while_unreachable(lookup, *args, stopping=lambda: self.runner.stopping)

    # -- taking requests ------------------------------------------------------------------------

    async def _take_requests(self, stream: faust.StreamT) -> None:
        async for event in cast(faust.Stream, stream).noack().events():
            if self.app.should_stop:
                continue  # tables are revoked by now: left unacked, taken by the next owner
            try:
                started = await self._take_until_done(event)
            except Stopping:
                continue
            self._ack_after(event, started)

    async def _take_until_done(self, event: faust.EventT) -> tuple[str, asyncio.Future] | None:
        """Take the request; an unexpected error is retried (acking an untaken request would lose
        its job); only an unreadable request is acked untaken."""
        backoff = Backoff(1.0, 5.0)
        message = event.message
        while True:
            try:
                request = JobRequest.from_bytes(event.value)
                location = RequestLocation(topic=message.topic, partition=message.partition, offset=message.offset)
                return await self._take(request, location)
            except ValidationError:
                log.exception("request at %s offset %s is unreadable; skipped", message.tp, message.offset)
                return None
            except Stopping:
                raise
            except Exception:
                if self.runner.stopping:
                    raise Stopping() from None
                log.exception("request at %s offset %s could not be taken; trying again", message.tp, message.offset)
                await backoff.wait()

    async def _take(self, request: JobRequest, location: RequestLocation) -> tuple[str, asyncio.Future] | None:
        state = self.book.get(request.id)
        if state is not None and (state.status is not JobStatus.pending or state.waiting_for is not None):
            return None  # finished, started (an orphan is resumed by the timer) or in its lane already
        recorded = self.quiet_starts.recorded(request.id)
        if recorded is not None:
            return request.id, recorded  # started quietly: acked once Kafka has the job's first record
        if request.id in self._running:
            return None  # started here the usual way: its processing record is written or on its way
        state = state or JobState.pending(request)
        claim, waiting = await self.lanes.admit(state, request, location)
        if waiting is not None:
            return request.id, waiting
        if not await self.runner.wait_for_slot():
            if claim is not None:
                claim.release()
            raise Stopping()
        # Quiet only while the partition is writable: during a rebalance's recovery a held start
        # could not be recorded when due.
        unseen = (location.offset >= self._unseen_from.get((location.topic, location.partition), float("inf"))
                  and self.owns(self.book.partition_of(request.id)))
        return request.id, self.start(state, request, location, claim, quiet=unseen)

    def start(self, state: JobState, request: JobRequest, location: RequestLocation,
              claim: Claim | None = None, quiet: bool = False) -> asyncio.Future:
        """Start the job's call; the future is done when Kafka has its first record (``processing``,
        written first unless ``quiet``: then only if the call outlasts a moment)."""
        started = state.processing(location, runner=self.id)
        if started.attempts > 1:
            self.possible_duplicate_calls += 1
            log.info("job %s: starting again (attempt %d)", state.id, started.attempts)
        self._running[state.id] = started
        if quiet and self.quiet_starts.after_seconds > 0:
            recorded = self.quiet_starts.start(started)
            self.runner.launch(request, claim=claim)
            return recorded
        write = self.book.put(started)
        self.runner.launch(request, after=write, claim=claim)
        return write

    def _record_start(self, started: JobState, revoking: bool = False) -> asyncio.Future | None:
        """Write a quiet start's record (``started``, or its outcome): to the table while its
        partition is ours (or being revoked from us), straight to the changelog once the worker
        stops (Faust has revoked the tables); None if the partition has moved away."""
        if self.app.should_stop:
            return self._write_to_changelog(started)
        if revoking or self.owns(self.book.partition_of(started.id)):
            return self.book.put(started)
        return None

    def _write_to_changelog(self, state: JobState) -> asyncio.Future:
        """Write a job's state straight to the changelog: once stopping, Faust has revoked the tables."""
        return self.table.send_changelog(self.book.partition_of(state.id), state.id.encode(), state.to_bytes())

    def _ack_after(self, event: faust.EventT, written: tuple[str, asyncio.Future] | None) -> None:
        """Ack once Kafka has the event's write: a committed request always has its job's state.

        A write Kafka acknowledges acks the event from its callback (no task per event); a failed
        one is sent again by a task until it is acknowledged or its partition moves away."""
        if written is None:
            event.ack()
            return
        job_id, write = written

        def on_written(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                event.ack()
                return
            task = asyncio.ensure_future(self._ack_when_written(event, job_id, done))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

        if write.done():
            on_written(write)
        else:
            write.add_done_callback(on_written)

    async def _ack_when_written(self, event: faust.EventT, job_id: str, write: asyncio.Future) -> None:
        try:
            await self.book.until_acknowledged(job_id, write, self.owns)
        except PartitionMoved:
            return  # left unacked: the partition's next owner reads the event again
        event.ack()

    # -- outcomes -------------------------------------------------------------------------------

    async def record(self, event: JobEvent) -> None:
        """Record a call's outcome or retry report (the runner's ``report``; raising makes it retry).

        Owned partition: written to the table. Stopping (SIGTERM, calls drained; Faust has revoked
        the tables): the finished state straight to the changelog. Moved away during the call: the
        outcome through job events (a retry report is dropped: it only informs a poll)."""
        partition = self.book.partition_of(event.id)
        if self.owns(partition):
            try:
                await self._write_report(event)
                if event.kind == "outcome":
                    self._running.pop(event.id, None)
                return
            except PartitionMoved:
                pass
        if event.kind != "outcome":
            return
        started = self._running.get(event.id)
        if self.app.should_stop and started is not None and event.outcome is not None:
            await (self.quiet_starts.finish(event.id, event.outcome)  # stopping: to the changelog too
                   or self._write_to_changelog(started.finished(event.outcome)))
        else:
            self.in_transit.add(event.id)
            self._sending.add(event.id)
            try:
                sent = await self.events.send(key=event.id.encode(), value=event.to_bytes(), partition=partition)
                await sent  # acknowledged by Kafka (acks=all)
            finally:
                self._sending.discard(event.id)
        self._running.pop(event.id, None)

    async def _write_report(self, event: JobEvent) -> None:
        """Apply an outcome (once Kafka has it) or a retry report to the table."""
        if event.id in self.quiet_starts:
            if event.kind == "outcome" and event.outcome is not None:
                write = self.quiet_starts.finish(event.id, event.outcome)
                if write is None:
                    raise PartitionMoved(event.id)
                await self.book.until_acknowledged(event.id, write, self.owns)
                return
            self.quiet_starts.record_now(event.id)  # a retry: the call is not a fast one
        state = self.book.get(event.id)
        if state is None:
            return  # expired and deleted, or never known
        if event.kind == "retrying":
            if event.retry is not None and state.status is JobStatus.processing:
                self.book.put(state.retrying(event.retry))
            return
        if event.kind != "outcome" or event.outcome is None:
            return  # an order from an earlier version
        if state.status.is_terminal:
            self.duplicate_outcomes += 1
            return
        write = self.book.put(state.finished(event.outcome))
        await self.book.until_acknowledged(event.id, write, self.owns)

    async def _apply_job_events(self, stream: faust.StreamT) -> None:
        async for event in cast(faust.Stream, stream).noack().events():
            if self.app.should_stop:
                continue  # see _take_requests
            message = event.message
            try:
                job_event = JobEvent.from_bytes(event.value)
                await self._write_report(job_event)
                self.in_transit.discard(job_event.id)
                event.ack()
            except PartitionMoved:
                pass  # unacked: applied by the next owner
            except Exception:
                log.exception("job event at %s offset %s could not be applied; skipped", message.tp, message.offset)
                event.ack()
            if message.offset + 1 >= self._events_backlog.get(message.partition, 0):
                self._events_backlog.pop(message.partition, None)

    async def _maintain(self) -> None:
        self.maintain_now()

    def maintain_now(self) -> None:
        if not self.app.rebalancing and self._assignment_noted.is_set():
            self.maintenance.tick()


class MaintainAfterRebalance(faust.Sensor):
    """A maintenance round as soon as a rebalance has ended (recovery included): orphans are
    resumed at once, not up to the timer's interval later."""

    def __init__(self, worker: FerryWorker) -> None:
        super().__init__()
        self._worker = worker

    def on_rebalance_end(self, app: faust.types.AppT, state: dict) -> None:
        self._worker.maintain_now()


def worker_resources(worker: FerryWorker) -> type[mode.Service]:
    """A service that starts and stops the worker's provider client and request reader with its app."""

    class WorkerResources(mode.Service):
        """The provider client and the request reader, started and stopped with the app."""

        async def on_start(self) -> None:
            await worker.caller.start()
            await worker.fetcher.start()

        async def on_stop(self) -> None:
            await worker.lanes.stop()
            await worker.runner.drain(0)  # after the graceful drain, if it ran: cancel the rest
            await worker.caller.stop()
            await worker.fetcher.stop()

    return WorkerResources
