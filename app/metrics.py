"""Prometheus metrics: every metric the API and the worker export, defined once.

Each process (and each app a test builds) holds its own ``ApiMetrics`` or ``WorkerMetrics``,
whose metrics live in a registry of their own, not prometheus-client's global one: two apps in
one process (the tests run an API and a worker side by side) then count apart, and ``render``
exports exactly one process's numbers.

Units are base units (seconds, counts) and every label takes values from a bounded set: a
request type (one of ``RequestType``), a provider (the configured names; any other reads
``unknown``), a status (``status_label``), a refusal reason (``REFUSAL_REASONS``) or an API
operation. Never a job id, a model name or a message: their values are unbounded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.jobs import RequestType

# Provider answers kept as their exact code: each means something different to an operator
# (a bad key, a rate limit, an overloaded provider, a gateway timing out). Any other code is
# counted under its class ("4xx"...): a provider, or a proxy in front of it, may answer any
# code, and each distinct value would be a series of its own.
EXACT_STATUS_CODES = frozenset({200, 400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529})
# A call that got no answer: cut off by its timeout, or the provider could not be reached.
NO_ANSWER_TIMEOUT = "timeout"
NO_ANSWER_UNREACHABLE = "unreachable"
# A call refused before it was sent: a header that is not valid HTTP (a broken provider key).
NOT_SENT = "not_sent"

# Why the API refused a submit (nothing was queued, except perhaps for kafka_uncertain).
REFUSAL_REASONS = ("invalid_request", "too_large", "timeout", "kafka_unavailable", "kafka_uncertain",
                   "not_found", "other_client_error", "internal_error")

# The API's routes, as the operation label names them.
API_OPERATIONS = ("submit", "poll", "health", "metrics", "openapi", "other")

UNKNOWN_PROVIDER = "unknown"
NO_PROVIDER = "none"  # a job that failed before any provider was chosen

# Provider calls: from a fast embedding to a long generation (providers' timeouts reach minutes).
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Jobs, submit to outcome, and their wait in Kafka: retries and backlogs stretch them to hours.
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
               10800.0)
# The API's own answers: milliseconds normally, seconds when Kafka is slow to confirm.
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def status_label(status_code: int) -> str:
    """A provider's answer as a bounded label value: the exact code if it is one operators tell
    apart (``EXACT_STATUS_CODES``), else its class, such as ``4xx``."""
    if status_code in EXACT_STATUS_CODES:
        return str(status_code)
    if 100 <= status_code <= 599:
        return f"{status_code // 100}xx"
    return "other"


def refusal_reason(status: int, uncertain: bool = False) -> str:
    """Why a submit was refused, from the status the API answered with (api/errors.py gives
    each kind of refusal its own status); ``uncertain``: the 503 named a job that may exist."""
    if status == 400:
        return "invalid_request"
    if status == 413:
        return "too_large"
    if status == 408:
        return "timeout"
    if status == 503:
        return "kafka_uncertain" if uncertain else "kafka_unavailable"
    if status in (404, 405):
        return "not_found"
    if 400 <= status < 500:
        return "other_client_error"
    return "internal_error"


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text exposition format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Providers:
    """Bounds the provider label to the configured names."""

    def __init__(self, providers: Iterable[str]) -> None:
        self.names = frozenset(providers)

    def label(self, provider: str | None) -> str:
        if provider is None:
            return NO_PROVIDER
        return provider if provider in self.names else UNKNOWN_PROVIDER


class ApiMetrics:
    """The API's metrics: submits accepted and refused, and its answers."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.jobs_submitted = Counter(
            "ferry_jobs_submitted", "Jobs accepted (202) and queued, by request type.",
            ["request_type"], registry=registry)
        self.jobs_refused = Counter(
            "ferry_jobs_refused", "Submits refused (4xx/5xx), by request type and reason.",
            ["request_type", "reason"], registry=registry)
        self.responses = Counter(
            "ferry_api_responses", "The API's answers, by operation and HTTP status code.",
            ["operation", "status_code"], registry=registry)
        self.request_duration = Histogram(
            "ferry_api_request_duration_seconds", "Time to answer a request (a submit includes Kafka's "
            "acknowledgement), by operation.", ["operation"], buckets=API_BUCKETS, registry=registry)
        for request_type in RequestType:
            self.jobs_submitted.labels(request_type.value)  # the series exist, at 0, before any submit
        # Every answer counts in two series; labels() checks and joins its arguments each time
        # (a few per cent of a poll's CPU), so each series is looked up once.
        self._answers = functools.cache(lambda operation, status: self.responses.labels(operation, str(status)))
        self._durations = functools.cache(lambda operation: self.request_duration.labels(operation))

    def count_answer(self, operation: str, request_type: RequestType | None, status: int, seconds: float,
                     uncertain: bool = False) -> None:
        self._answers(operation, status).inc()
        self._durations(operation).observe(seconds)
        if operation == "submit" and request_type is not None:
            if status == 202:
                self.jobs_submitted.labels(request_type.value).inc()
            elif status >= 400:
                self.jobs_refused.labels(request_type.value, refusal_reason(status, uncertain)).inc()

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)


@dataclass
class WorkerSnapshot:
    """What the worker reports at scrape time rather than counts as it goes."""

    jobs_in_flight: int = 0
    jobs_waiting: dict[str, int] = field(default_factory=dict)  # per limited provider, in its lane
    possible_duplicate_calls: int = 0
    duplicate_outcomes: int = 0
    dead_lettered_jobs: int = 0
    # Per request type: requests in this worker's assigned partitions not yet taken (log end
    # minus the group's committed offset).
    consumer_lag: dict[RequestType, int] = field(default_factory=dict)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], WorkerSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        in_flight = GaugeMetricFamily("ferry_worker_jobs_in_flight",
                                      "Jobs whose provider calls run in this worker now.")
        in_flight.add_metric([], snap.jobs_in_flight)
        waiting = GaugeMetricFamily("ferry_worker_jobs_waiting", "Jobs waiting in this worker for a limited "
                                    "provider's room (their requests in Kafka), by provider.", labels=["provider"])
        for provider, count in sorted(snap.jobs_waiting.items()):
            waiting.add_metric([provider], count)
        duplicates = CounterMetricFamily(
            "ferry_worker_possible_duplicate_calls", "Jobs this worker started that an earlier worker had "
            "started too (its provider call may have been made twice).")
        duplicates.add_metric([], snap.possible_duplicate_calls)
        outcomes = CounterMetricFamily("ferry_worker_duplicate_outcomes",
                                       "Outcomes that arrived for a job already finished (and were dropped).")
        outcomes.add_metric([], snap.duplicate_outcomes)
        dead = CounterMetricFamily("ferry_jobs_dead_lettered", "Jobs abandoned after job_max_attempts starts, "
                                   "their requests copied to the dead-letter topic.")
        dead.add_metric([], snap.dead_lettered_jobs)
        lag = GaugeMetricFamily("ferry_worker_consumer_lag", "Requests in this worker's partitions not yet "
                                "taken (log end offset minus committed offset), by request type.",
                                labels=["request_type"])
        for request_type in RequestType:
            lag.add_metric([request_type.value], snap.consumer_lag.get(request_type, 0))
        return [in_flight, waiting, duplicates, outcomes, dead, lag]


class WorkerMetrics:
    """The worker's metrics: jobs' outcomes and durations, provider calls, and (at scrape time,
    from ``watch``) calls in flight, duplicates, dead letters and consumer lag."""

    def __init__(self, providers: Iterable[str] = ()) -> None:
        self.providers = _Providers(providers)
        self.registry = registry = CollectorRegistry()
        self.jobs_completed = Counter(
            "ferry_jobs_completed", "Jobs whose provider call succeeded, by request type and the provider that "
            "served them.", ["request_type", "provider"], registry=registry)
        self.jobs_failed = Counter(
            "ferry_jobs_failed", "Jobs that ended with an error from their calls, by request type and the last "
            "provider tried (none: no provider was called).", ["request_type", "provider"], registry=registry)
        self.job_duration = Histogram(
            "ferry_job_duration_seconds", "Submit (the job's created_at) to its outcome, by request type and "
            "status.", ["request_type", "status"], buckets=JOB_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "ferry_job_queue_wait_seconds", "Submit (the job's created_at) to the start of its provider calls in "
            "a worker, by request type.", ["request_type"], buckets=JOB_BUCKETS, registry=registry)
        self.call_duration = Histogram(
            "ferry_provider_call_duration_seconds", "One HTTP call to a provider, sent to answered (or given "
            "up), by provider and request type.", ["provider", "request_type"], buckets=CALL_BUCKETS,
            registry=registry)
        self.calls = Counter(
            "ferry_provider_calls", "HTTP calls to providers, by provider and status code (exact for common "
            "codes, else its class; timeout or unreachable when no answer came).", ["provider", "status_code"],
            registry=registry)
        self.retries = Counter(
            "ferry_provider_retries", "Calls made again to the same provider after a failure that may pass, by "
            "provider.", ["provider"], registry=registry)
        self.calls_in_flight = Gauge(
            "ferry_provider_calls_in_flight", "HTTP calls to providers awaiting their answer, by provider.",
            ["provider"], registry=registry)
        for request_type in RequestType:
            for provider in self.providers.names:
                self.jobs_completed.labels(request_type.value, provider)
                self.jobs_failed.labels(request_type.value, provider)

    def watch(self, snapshot: Callable[[], WorkerSnapshot]) -> None:
        """Report what ``snapshot()`` returns at every scrape (the worker's own counters)."""
        self.registry.register(_SnapshotCollector(snapshot))

    def provider(self, name: str | None) -> str:
        return self.providers.label(name)

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)
