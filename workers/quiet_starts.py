"""Fast calls' starts: a call that ends within a moment is recorded by its outcome alone.

Recording ``processing`` before each call costs a Kafka write (acknowledged before the call
starts) and a record every API replica's read model fetches: at modest rates a fifth of the
Kafka requests a job makes. A call of a request no worker can have taken before (past the end
of its partition when this worker was assigned it) therefore starts at once, unrecorded; its
``processing`` record is written only if the call outlasts ``worker_processing_record_after_seconds``
(or reports a retry, or its partition is revoked), and otherwise its outcome is its first record,
with the attempt counted in it.

What this changes, and why it is safe: until its record is written the job reads ``pending``;
its request event is acked only once Kafka has its first record, so a worker that dies before
that leaves the request uncommitted, and the partition's next owner takes it again. That
request is then below the new owner's assignment-time end, so its start is recorded before its
call: a poison request costs one uncounted crash before ``job_max_attempts`` counts the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from app.jobs import JobState, Outcome

Write = Callable[[JobState], "asyncio.Future | None"]


class QuietStarts:
    """The calls in flight whose ``processing`` record is not written yet."""

    def __init__(self, after_seconds: float, write: Write) -> None:
        self.after_seconds = after_seconds
        self._write = write  # writes a state to the table; None if the job's partition is not ours now
        # Per job: the state its record will hold, the timer that writes it, and the future done
        # when Kafka has the job's first record (processing or outcome).
        self._unrecorded: dict[str, tuple[JobState, asyncio.TimerHandle, asyncio.Future]] = {}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._unrecorded

    def start(self, started: JobState) -> asyncio.Future:
        """Hold back ``started`` (the job's processing state); the future is done when Kafka has
        the job's first record."""
        loop = asyncio.get_running_loop()
        recorded = loop.create_future()
        timer = loop.call_later(self.after_seconds, self.record_now, started.id)
        self._unrecorded[started.id] = (started, timer, recorded)
        return recorded

    def recorded(self, job_id: str) -> asyncio.Future | None:
        """The future done when Kafka has a held-back job's first record; None if not held back."""
        held = self._unrecorded.get(job_id)
        return held[2] if held is not None else None

    def record_now(self, job_id: str, write: Write | None = None) -> None:
        """Write the job's processing record now, if it is still held back (the timer, a retry
        report, a revocation; ``write`` in place of the default one).

        A write refused (the partition is not writable this moment: Faust marks a rebalance as
        begun before the revocation reaches the worker) leaves the start held, for the
        revocation to write: dropped, the next owner found the job ``pending`` and called again."""
        held = self._unrecorded.get(job_id)
        if held is None:
            return
        started, timer, recorded = held
        written = (write or self._write)(started)
        if written is None:
            return
        del self._unrecorded[job_id]
        timer.cancel()
        _settle(recorded, written)

    def record_all(self, write: Write | None = None) -> None:
        for job_id in list(self._unrecorded):
            self.record_now(job_id, write)

    def finish(self, job_id: str, outcome: Outcome) -> asyncio.Future | None:
        """Write a held-back job's outcome as its first record (None if the job is not held back,
        or its partition is not writable now: then the start stays held for the revocation to
        record as ``processing``, and the outcome goes through job events)."""
        held = self._unrecorded.get(job_id)
        if held is None:
            return None
        started, timer, recorded = held
        write = self._write(started.finished(outcome))
        if write is None:
            return None
        del self._unrecorded[job_id]
        timer.cancel()
        _settle(recorded, write)
        return write


def _settle(recorded: asyncio.Future, write: asyncio.Future | None) -> None:
    """Complete ``recorded`` as ``write`` completes (never, if nothing was written)."""
    if write is None:
        return

    def copy(done: asyncio.Future) -> None:
        if recorded.done():
            return
        if done.cancelled():
            recorded.cancel()
        elif (exc := done.exception()) is not None:
            recorded.set_exception(exc)
        else:
            recorded.set_result(done.result())

    write.add_done_callback(copy)
