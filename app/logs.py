"""Logging for the API and worker processes: one root handler, text or JSON lines, with known
transient Kafka-client errors demoted and repeated records rate-limited.

Both processes call ``configure_logging(settings)`` once at start; the worker tells Faust not to
configure logging itself. The handler carries two filters, in this order:

1. ``TransientConditionFilter`` lowers the level of the Kafka clients' records that report a
   condition which is normal while topics are being created and partition leaders elected
   (``TRANSIENT_CONDITIONS`` lists each one and why). A condition that goes on for longer than
   ``TRANSIENT_GRACE_SECONDS`` is not transient: its records keep their own level.
2. ``RepeatedRecordLimiter`` passes at most ``REPEAT_LIMIT`` records per logger and message
   template in ``REPEAT_INTERVAL_SECONDS``; when the interval ends, one line says how many like
   them were suppressed. A Kafka outage under load otherwise wrote ~11,600 ERROR lines a second.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO

from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    IllegalGenerationError,
    NotLeaderForPartitionError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from app.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Passed with ``extra=`` by Ferry's code; the JSON format writes them as fields of their own.
EXTRA_FIELDS = ("job_id", "request_type", "provider")

# Ten lines show a repeated failure's variety (different jobs, partitions, errors), and ten
# seconds keeps a persistent one visible (a summary line every ten seconds) while bounding each
# message template to about one line a second, so an outage cannot fill a disk with one message
# (the volume before and after is in docs/benchmarks.md).
REPEAT_LIMIT = 10
REPEAT_INTERVAL_SECONDS = 10.0
# Topic creation and leader election take seconds even on a new broker; a condition still
# reported after a minute is a failure and is logged at its own level again. A condition not
# reported for ten minutes (longer than aiokafka's 5-minute metadata refresh, so a persistent
# one never looks new) starts over as transient, e.g. a leader election after a broker restart.
TRANSIENT_GRACE_SECONDS = 60.0
TRANSIENT_RESET_SECONDS = 600.0
SWEEP_PERIOD_SECONDS = 1.0

SUMMARY_MARK = "ferry_repeat_summary"  # set on the limiter's own summary records


@dataclass(frozen=True)
class TransientCondition:
    """A Kafka client's record that reports a condition which is normal for a while."""

    logger: str
    template: str  # the record's msg, before formatting
    level: int  # the level it is logged at while transient
    reason: str
    errors: tuple[type[BaseException], ...] = ()  # required among the args; empty: any record

    def matches(self, record: logging.LogRecord) -> bool:
        if not self.errors:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return any(isinstance(arg, self.errors) for arg in args)


# Found by starting the API and a worker (as `python -m ...`) on fresh topics, on the shared
# broker and on a new one, and collecting every ERROR record; these were all of them. Each is
# keyed by logger and template, and by the error among the args where the template is generic.
TRANSIENT_CONDITIONS = (
    TransientCondition(
        "aiokafka.cluster", "Topic %s not found in cluster metadata", logging.INFO,
        reason="Faust creates its <app id>-__assignor-__leader topic at start, and one process "
        "asks for topics another is creating; aiokafka logs each metadata refresh that misses "
        "them (every 100 ms) until the creation is visible",
    ),
    TransientCondition(
        "aiokafka.consumer.fetcher", "Failed fetch offsets from %s: %s", logging.INFO,
        errors=(NotLeaderForPartitionError,),
        reason="the API's read model asks for the end offsets of a changelog created a moment "
        "ago, before its partitions have leaders; aiokafka retries every 100 ms, a line each time",
    ),
    TransientCondition(
        "aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s", logging.INFO,
        errors=(GroupCoordinatorNotAvailableError,),
        reason="on a new broker, __consumer_offsets is created by the first group's request and "
        "has no leader for a moment; aiokafka retries",
    ),
    TransientCondition(
        "aiokafka.consumer.group_coordinator", "OffsetCommit failed for group %s due to group error (%s), will rejoin",
        logging.WARNING, errors=(UnknownMemberIdError, IllegalGenerationError, RebalanceInProgressError),
        reason="a commit from before a rebalance (a worker joined or left, or stalled past its session "
        "timeout) is refused; the worker rejoins and takes the uncommitted records again, which Ferry "
        "handles (workers/app.py). A warning, not an error: a stall has warnings of its own (Faust's "
        "'Task timed out', 'Kafka read failed'). Seen once in a first start on a loaded machine",
    ),
)


class TransientConditionFilter(logging.Filter):
    """Lowers the level of records in ``conditions`` while their condition is young, and drops
    records (demoted ones) below ``min_level``."""

    def __init__(self, conditions: Iterable[TransientCondition] = TRANSIENT_CONDITIONS, *,
                 min_level: int = logging.NOTSET,
                 grace_seconds: float = TRANSIENT_GRACE_SECONDS, reset_seconds: float = TRANSIENT_RESET_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.min_level = min_level
        self.grace_seconds = grace_seconds
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._by_key: dict[tuple[str, str], list[TransientCondition]] = {}
        for condition in conditions:
            self._by_key.setdefault((condition.logger, condition.template), []).append(condition)
        self._streaks: dict[TransientCondition, list[float]] = {}  # condition: [first, last] seen
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        conditions = self._by_key.get((record.name, record.msg)) if isinstance(record.msg, str) else None
        condition = next((c for c in conditions if c.matches(record)), None) if conditions else None
        if condition is not None and condition.level < record.levelno and self._still_transient(condition):
            record.levelno = condition.level
            record.levelname = logging.getLevelName(condition.level)
        return record.levelno >= self.min_level

    def _still_transient(self, condition: TransientCondition) -> bool:
        now = self._clock()
        with self._lock:
            streak = self._streaks.get(condition)
            if streak is None or now - streak[1] > self.reset_seconds:
                streak = self._streaks[condition] = [now, now]
            streak[1] = now
            return now - streak[0] < self.grace_seconds


@dataclass
class _Window:
    logger: str
    template: str
    started: float
    seen: int = 0
    suppressed: int = 0
    level: int = logging.NOTSET  # the highest level among the suppressed records


class RepeatedRecordLimiter(logging.Filter):
    """Passes at most ``limit`` records per (logger, message template) in each ``interval``;
    the first record of a (logger, template) not seen in the current interval always passes.

    When an interval that suppressed records ends, ``emit`` gets one summary record (logger of
    the suppressed ones, their highest level). Intervals end when the same key logs again, or
    at ``emit_due()`` (called every second by ``configure_logging``'s sweeper thread), or at
    ``flush()`` (at exit). DEBUG records are never limited: whoever turns DEBUG on wants them all.
    """

    def __init__(self, limit: int = REPEAT_LIMIT, interval: float = REPEAT_INTERVAL_SECONDS, *,
                 emit: Callable[[logging.LogRecord], object] = lambda record: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limit = limit
        self.interval = interval
        self.emit = emit
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or getattr(record, SUMMARY_MARK, False):
            return True
        # A message that is not a string (an exception logged as is) is keyed by its type.
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        key = (record.name, template)
        now = self._clock()
        ended = None
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.started >= self.interval:
                ended = window
                window = self._windows[key] = _Window(record.name, template, now)
            window.seen += 1
            passes = window.seen <= self.limit
            if not passes:
                window.suppressed += 1
                window.level = max(window.level, record.levelno)
        if ended is not None and ended.suppressed:
            self.emit(self._summary(ended))  # before this record: the lines are in order
        return passes

    def emit_due(self) -> None:
        """Ends the intervals that are over: their summaries are emitted, their keys forgotten."""
        now = self._clock()
        with self._lock:
            ended = [key for key, window in self._windows.items() if now - window.started >= self.interval]
            windows = [self._windows.pop(key) for key in ended]
        for window in windows:
            if window.suppressed:
                self.emit(self._summary(window))

    def flush(self) -> None:
        """Ends every interval now (the process is leaving): nothing suppressed goes unmentioned."""
        with self._lock:
            windows, self._windows = list(self._windows.values()), {}
        for window in windows:
            if window.suppressed:
                self.emit(self._summary(window))

    def _summary(self, window: _Window) -> logging.LogRecord:
        record = logging.LogRecord(
            window.logger, window.level, __file__, 0,
            "suppressed %d more lines like %r (at most %d per %.0f s are written)",
            (window.suppressed, window.template, self.limit, self.interval), None,
        )
        setattr(record, SUMMARY_MARK, True)
        return record


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, Ferry's extra fields, and
    the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        entry = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


@dataclass
class _Installed:
    handler: logging.Handler
    limiter: RepeatedRecordLimiter
    stop_sweeper: threading.Event = field(default_factory=threading.Event)


_installed: _Installed | None = None


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """Send every record to ``stream`` (stderr) at ``settings.log_level``, in
    ``settings.log_format``, through the two filters; replaces what an earlier call installed."""
    global _installed
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise SystemExit(f"FERRY_LOG_LEVEL={settings.log_level!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    root = logging.getLogger()
    if _installed is not None:
        _installed.stop_sweeper.set()
        _installed.limiter.flush()
        root.removeHandler(_installed.handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(JsonLinesFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    limiter = RepeatedRecordLimiter(emit=handler.handle)
    handler.addFilter(TransientConditionFilter(min_level=level))  # first: the limiter counts what is written
    handler.addFilter(limiter)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings as records too: in json, every line is JSON
    _installed = installed = _Installed(handler, limiter)
    threading.Thread(target=_sweep, args=(installed,), name="ferry-log-sweeper", daemon=True).start()
    return handler


def _sweep(installed: _Installed) -> None:
    while not installed.stop_sweeper.wait(SWEEP_PERIOD_SECONDS):
        installed.limiter.emit_due()


@atexit.register  # registered after logging's own shutdown hook, so it runs before it
def _flush_at_exit() -> None:
    if _installed is not None:
        _installed.limiter.flush()
