"""Ferry's logging (app/logs.py): repeated records rate-limited with a summary, transient Kafka
client errors demoted while young, JSON lines, and the handler both processes install."""

from __future__ import annotations

import io
import json
import logging

import pytest
from aiokafka.errors import KafkaConnectionError, NotLeaderForPartitionError, UnknownTopicOrPartitionError

import app.logs
from app.logs import (
    REPEAT_INTERVAL_SECONDS,
    REPEAT_LIMIT,
    TRANSIENT_GRACE_SECONDS,
    TRANSIENT_RESET_SECONDS,
    JsonLinesFormatter,
    RepeatedRecordLimiter,
    TransientConditionFilter,
    configure_logging,
)
from app.settings import Settings

FETCH_OFFSETS = "Failed fetch offsets from %s: %s"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Written(logging.Handler):
    """A handler that keeps what it would write."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records]


def record(msg: str, *args, logger: str = "workers.acks", level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, msg, args, None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limited(clock: FakeClock) -> tuple[Written, RepeatedRecordLimiter]:
    written = Written()
    limiter = RepeatedRecordLimiter(limit=3, interval=10, emit=written.handle, clock=clock)
    written.addFilter(limiter)
    return written, limiter


def test_repeats_beyond_the_limit_are_suppressed_and_counted_when_the_interval_ends(limited, clock) -> None:
    written, limiter = limited
    for offset in range(50):
        written.handle(record("not acking %s offset %s", "tp-1", offset))
        clock.now += 0.1
    assert written.lines == [f"ERROR workers.acks: not acking tp-1 offset {n}" for n in range(3)]

    clock.now += 10  # the interval is over; the next record of the same kind ends it
    written.handle(record("not acking %s offset %s", "tp-1", 99))
    assert written.lines[3:] == [
        "ERROR workers.acks: suppressed 47 more lines like 'not acking %s offset %s' (at most 3 per 10 s are written)",
        "ERROR workers.acks: not acking tp-1 offset 99",
    ]


def test_the_first_occurrence_of_another_message_is_never_dropped(limited, clock) -> None:
    written, _ = limited
    for _ in range(100):
        written.handle(record("flood %s", 1))
    written.handle(record("flood %s", 1, logger="api.publisher"))  # same template, another logger
    written.handle(record("something else happened"))
    assert written.lines[3:] == ["ERROR api.publisher: flood 1", "ERROR workers.acks: something else happened"]


def test_an_interval_that_ends_quietly_is_summarised_by_the_sweep_and_at_exit(limited, clock) -> None:
    written, limiter = limited
    for _ in range(5):
        written.handle(record("one %s", "x", level=logging.WARNING))
    written.handle(record("two %s", "y"))
    written.handle(record("two %s", "y", level=logging.CRITICAL))
    for _ in range(4):
        written.handle(record("three"))

    clock.now += 5
    limiter.emit_due()  # not over yet: nothing
    assert len(written.records) == 3 + 2 + 3

    clock.now += 5
    limiter.emit_due()
    summary = written.records[-1]
    assert written.lines[-2:] == [
        "WARNING workers.acks: suppressed 2 more lines like 'one %s' (at most 3 per 10 s are written)",
        "ERROR workers.acks: suppressed 1 more lines like 'three' (at most 3 per 10 s are written)",
    ]
    assert summary.levelno == logging.ERROR

    for _ in range(6):
        written.handle(record("four"))
    limiter.flush()  # the process is leaving mid-interval
    assert written.lines[-1] == ("ERROR workers.acks: suppressed 3 more lines like 'four' "
                                 "(at most 3 per 10 s are written)")
    count = len(written.records)
    limiter.flush()
    clock.now += 100
    limiter.emit_due()
    assert len(written.records) == count  # each suppression is summarised once


def test_debug_records_are_not_limited(limited) -> None:
    written, _ = limited
    for n in range(20):
        written.handle(record("frame %s", n, logger="aiokafka.conn", level=logging.DEBUG))
    assert len(written.records) == 20


def test_the_chosen_limit_bounds_a_flood() -> None:
    clock = FakeClock()
    written = Written()
    written.addFilter(RepeatedRecordLimiter(emit=written.handle, clock=clock))
    templates = ("not acking %s offset %s", "changelog write of %s failed (%s); again in %.1f s")
    for tick in range(400):  # 40 s of 1,000 records a second of each template
        clock.now += 0.1
        for template in templates:
            for n in range(100):
                written.handle(record(template, tick, n, 0.5))
    intervals = 40 / REPEAT_INTERVAL_SECONDS
    assert len(written.records) <= len(templates) * intervals * (REPEAT_LIMIT + 1)  # the lines and a summary


def test_a_transient_kafka_condition_is_demoted_while_young_and_logged_as_error_when_it_persists(clock) -> None:
    written = Written(logging.INFO)
    written.addFilter(TransientConditionFilter(min_level=logging.INFO, clock=clock))

    def not_leader() -> logging.LogRecord:
        return record(FETCH_OFFSETS, 1, NotLeaderForPartitionError(), logger="aiokafka.consumer.fetcher")

    written.handle(not_leader())
    clock.now += TRANSIENT_GRACE_SECONDS - 1
    written.handle(not_leader())
    assert [r.levelname for r in written.records] == ["INFO", "INFO"]

    clock.now += 2  # still reported after the grace period: a failure
    written.handle(not_leader())
    assert written.records[-1].levelname == "ERROR"

    clock.now += TRANSIENT_RESET_SECONDS + 1  # quiet for long: a new episode (a leader election later on)
    written.handle(not_leader())
    assert written.records[-1].levelname == "INFO"


def test_only_the_listed_conditions_are_demoted(clock) -> None:
    written = Written(logging.INFO)
    written.addFilter(TransientConditionFilter(min_level=logging.INFO, clock=clock))
    written.handle(record(FETCH_OFFSETS, 1, KafkaConnectionError(), logger="aiokafka.consumer.fetcher"))
    written.handle(record(FETCH_OFFSETS, 1, UnknownTopicOrPartitionError(), logger="aiokafka.consumer.fetcher"))
    written.handle(record("Topic %s not found in cluster metadata", "ferry-x", logger="some.other.logger"))
    written.handle(record("Topic %s not found in cluster metadata", "ferry-x", logger="aiokafka.cluster"))
    assert [r.levelname for r in written.records] == ["ERROR", "ERROR", "ERROR", "INFO"]


def test_a_demoted_record_below_the_configured_level_is_not_written(clock) -> None:
    written = Written(logging.WARNING)
    written.addFilter(TransientConditionFilter(min_level=logging.WARNING, clock=clock))
    written.handle(record("Topic %s not found in cluster metadata", "ferry-x", logger="aiokafka.cluster"))
    written.handle(record("Topic %s is not authorized for this client", "ferry-x", logger="aiokafka.cluster"))
    assert [r.getMessage() for r in written.records] == ["Topic ferry-x is not authorized for this client"]


def test_json_lines_carry_time_level_logger_message_and_the_extra_fields() -> None:
    entry = record("job %s: provider %s unreachable", "j-1", "openai", logger="workers.caller", level=logging.WARNING)
    entry.job_id, entry.request_type, entry.provider, entry.unrelated = "j-1", "chat_completion", "openai", "x"
    entry.created = 1764662400.25
    line = JsonLinesFormatter().format(entry)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2025-12-02T08:00:00.250Z", "level": "WARNING", "logger": "workers.caller",
        "message": "job j-1: provider openai unreachable",
        "job_id": "j-1", "request_type": "chat_completion", "provider": "openai",
    }
    try:
        raise ValueError("multi\nline")
    except ValueError:
        import sys

        failed = logging.LogRecord("api.errors", logging.ERROR, __file__, 1, "unexpected error", (), sys.exc_info())
    parsed = json.loads(JsonLinesFormatter().format(failed))
    assert parsed["message"] == "unexpected error" and "ValueError: multi\nline" in parsed["exception"]


@pytest.fixture
def root_logging():
    """configure_logging changes the root logger: put it back afterwards."""
    root = logging.getLogger()
    level = root.level
    yield
    installed = app.logs._installed
    if installed is not None:
        installed.stop_sweeper.set()
        root.removeHandler(installed.handler)
        app.logs._installed = None
    root.setLevel(level)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_configure_logging_installs_one_filtered_handler_on_the_root(root_logging, log_format: str) -> None:
    out = io.StringIO()
    settings = Settings(log_level="INFO", log_format=log_format)
    configure_logging(settings, out)
    configure_logging(settings, out)  # again: replaces, never doubles
    log = logging.getLogger("tests.logs")
    log.debug("not at INFO")
    for n in range(REPEAT_LIMIT + 5):
        log.error("the same failure %d", n, extra={"job_id": f"j-{n}"})
    logging.getLogger("aiokafka.cluster").error("Topic %s not found in cluster metadata", "ferry-new")
    app.logs._installed.limiter.flush()

    lines = out.getvalue().splitlines()
    assert len(lines) == REPEAT_LIMIT + 2
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert entries[0]["job_id"] == "j-0" and entries[0]["level"] == "ERROR" and entries[0]["logger"] == "tests.logs"
        assert entries[-2] == entries[-2] | {"level": "INFO", "logger": "aiokafka.cluster",
                                             "message": "Topic ferry-new not found in cluster metadata"}
        assert entries[-1]["message"].startswith("suppressed 5 more lines like 'the same failure %d'")
    else:
        assert lines[0].endswith(" ERROR tests.logs: the same failure 0")
        assert lines[-2].endswith(" INFO aiokafka.cluster: Topic ferry-new not found in cluster metadata")
        assert "ERROR tests.logs: suppressed 5 more lines like 'the same failure %d'" in lines[-1]


def test_log_format_accepts_text_and_json_only() -> None:
    assert Settings().log_format == "text"
    with pytest.raises(ValueError):
        Settings(log_format="xml")
