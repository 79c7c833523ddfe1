"""Calling providers: the only module that does provider network I/O (aiohttp's client).

``ProviderCaller.run(request)`` tries the job's targets in order (primary, then fallbacks) and
returns its ``Outcome``. Each target is called up to ``retry_max_attempts`` times while it fails
in a way that may pass (429, 5xx, timeout, connection failure), waiting an exponential backoff
with jitter, or the provider's ``Retry-After`` if longer (both capped at
``retry_max_backoff_seconds``). Each call waits for its provider's limits (``workers/limits.py``;
a job's first call uses the place its lane claimed) and lasts at most its provider's
``timeout_seconds``, the whole call.

What a failure leads to, and who it is blamed on (``is_bifrost_error``):

    failure                                status and message                           blame  retried  then
    provider answered 429 or 5xx         -> its status, its message                       False  yes      next target
    provider answered another status     -> its status, its message                       False  no       job ends
    provider timed out                   -> 504 "provider request timed out"              True   yes      next target
    provider unreachable                 -> 502 "could not reach provider"                True   yes      next target
    request not sendable (a bad key)     -> 500 "the request could not be sent to P: ..." True   no       next target
    provider answered 2xx, unreadable    -> 502 "unreadable provider response"            True   no       next target
    result over max_result_bytes         -> 502 "provider result too large: ..."          True   no       next target
    provider not configured here for T   -> 400 "provider P is not configured for T"      True   no       next target
    body the provider can't express      -> 400 the adapter's reason                      True   no       next target
    job deadline reached                 -> 504 "job deadline of N s exceeded after K     True   no       job ends
                                                calls[; the last failed with S]"

("retried": the same target again, up to ``retry_max_attempts`` calls; "then": what follows
its last failure.)

So a target is left for the next one when it is overloaded or failing (after its retries), or
when this target cannot take the request at all (not configured here, cannot express it, answers
garbage); a provider's own refusal of the request (400, 401, 404, 422...) ends the job, since
another provider would refuse it too or the client must fix something. When every target has
failed, the job's error is the last target's.

The job's deadline (``job_deadline_seconds``, from the start of its first call in this worker)
bounds how long it holds an in-flight slot: no call or retry wait goes past it, each call's
timeout is cut to what is left, and a retry wait that would pass it gives the target up for the
next one at once (or, on the last target, ends the job with the deadline error).

A result carries ``extra_fields`` (provider, model_requested, request_type) saying which target
served it, as an error does. Nothing here logs a request's headers: they carry the provider key.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import aiohttp
import certifi
import orjson

from app.jobs import ErrorDetail, ErrorObject, JobRequest, Outcome, RequestType, RetryInfo, Target, utcnow
from app.metrics import NO_ANSWER_TIMEOUT, NO_ANSWER_UNREACHABLE, NOT_SENT, WorkerMetrics, status_label
from app.providers import ProviderEndpoint
from app.settings import Settings
from workers.limits import Claim, ProviderLimits
from workers.providers import ADAPTERS
from workers.providers.base import HttpRequest, HttpResponse, ProviderFailure, UnsupportedRequest

log = logging.getLogger(__name__)


def _extra_fields(target: Target, request_type: RequestType) -> dict[str, Any]:
    return {"provider": target.provider, "model_requested": target.model, "request_type": request_type.value}


def provider_error(failure: ProviderFailure, target: Target, request_type: RequestType) -> ErrorObject:
    return ErrorObject(
        is_bifrost_error=False, status_code=failure.status_code,
        error=ErrorDetail(message=failure.message, type=failure.type, code=failure.code, param=failure.param),
        extra_fields=_extra_fields(target, request_type),
    )


def service_error(status: int, message: str, error_type: str, target: Target | None,
                  request_type: RequestType) -> ErrorObject:
    return ErrorObject(
        is_bifrost_error=True, status_code=status, error=ErrorDetail(message=message, type=error_type),
        extra_fields=_extra_fields(target, request_type) if target else {"request_type": request_type.value},
    )


@dataclass(frozen=True)
class Attempt:
    """One call's outcome, and what may follow it."""

    outcome: Outcome
    retry_same: bool = False  # the same target may succeed later
    try_next: bool = False  # another target might succeed
    retry_after: float | None = None
    out_of_time: bool = False  # given up because a retry wait would pass the job's deadline


@dataclass
class JobClock:
    """A job's time in this worker: its deadline (event loop time) and the calls made so far."""

    seconds: float
    deadline: float
    calls: int = 0  # requests sent to providers
    last_failure: int | None = None  # status of the last failed attempt

    @classmethod
    def start(cls, seconds: float) -> JobClock:
        return cls(seconds, asyncio.get_running_loop().time() + seconds)

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def exceeded(self, target: Target, request_type: RequestType) -> Attempt:
        """The job's end at its deadline: 504, saying how far it got."""
        message = f"job deadline of {self.seconds:g} s exceeded after {self.calls} call{'' if self.calls == 1 else 's'}"
        if self.last_failure is not None:
            message += f"; the last failed with {self.last_failure}"
        error = service_error(504, message, "job_deadline_exceeded", target, request_type)
        return Attempt(Outcome(status_code=504, error=error))


OnRetry = Callable[[RetryInfo], Awaitable[None]]


class HeaderNotSendable(ValueError):
    """A request header whose value is not valid HTTP; the request is not sent. Its text never
    holds the value (a provider key, in practice)."""


def _check_headers(headers) -> None:
    # RFC 9110 5.5: visible ASCII, with spaces and tabs only between words. aiohttp would send a
    # trailing space or a non-ASCII byte as is: a key pasted with one fails as a wrong key (401,
    # the job ends) instead of as a configuration error (the next target serves).
    for name, value in headers.items():
        spaced = value.replace("\t", " ")
        if not (spaced.isascii() and spaced.isprintable()) or spaced != spaced.strip():
            raise HeaderNotSendable(f"header {name} is not valid HTTP")


def _form_value(value: Any) -> str | bytes:
    """A multipart form field as HTTP form encoders write it: true/false, empty for null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return value if isinstance(value, (str, bytes)) else str(value)


def _body(request: HttpRequest) -> dict[str, Any]:
    """The request's body as ``ClientSession.request`` arguments: JSON, or a multipart form."""
    if request.files:
        form = aiohttp.FormData(quote_fields=False)
        for name, value in (request.data or {}).items():
            for item in value if isinstance(value, list) else [value]:
                form.add_field(name, _form_value(item))
        for name, (filename, content, content_type) in request.files:
            form.add_field(name, content, filename=filename, content_type=content_type)
        return {"data": form}
    if request.json is not None:
        return {"data": orjson.dumps(request.json)}  # the adapter's headers say it is JSON
    return {"data": dict(request.data)} if request.data else {}


async def send(session: aiohttp.ClientSession, request: HttpRequest) -> HttpResponse:
    """Send one request and read its whole answer (no redirect followed)."""
    _check_headers(request.headers)
    async with session.request(request.method, request.url, headers=request.headers, allow_redirects=False,
                               **_body(request)) as reply:
        return HttpResponse(reply.status, reply.headers, await reply.read())


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """The process's provider client: ``http_max_connections`` connections in all, kept 30 s.

    aiohttp's client, not httpx: about a tenth of the CPU per call (docs/benchmarks.md, measured
    side by side with ``python -m bench.provider_client``). No cookies are kept (one job's must not
    reach another's calls); TLS trusts certifi's CA bundle, the same on every image.
    """
    connector = aiohttp.TCPConnector(limit=settings.http_max_connections, limit_per_host=0, keepalive_timeout=30.0,
                                     ssl=ssl.create_default_context(cafile=certifi.where()))
    # No total bound here: each call is bounded by its provider's timeout or the job's deadline.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.http_connect_timeout_seconds)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(),
                                 trust_env=False)


class ProviderCaller:
    """Owns the process's provider client (``new_session``); started and stopped once."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics or WorkerMetrics(settings.provider_endpoints)
        self._session: aiohttp.ClientSession | None = None
        self._limits: dict[str, ProviderLimits] = {}

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(self._settings)

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def run(self, request: JobRequest, on_retry: OnRetry | None = None, claim: Claim | None = None) -> Outcome:
        """The job's outcome after trying its targets in order, within the job's deadline.

        ``claim``: a place its lane took at a provider's limits; the first call to that provider
        uses it, and it is released if no call does."""
        try:
            clock = JobClock.start(self._settings.job_deadline_seconds)
            attempt: Attempt | None = None
            for target in request.targets:
                attempt = await self._call_with_retries(target, request, on_retry, clock, claim)
                if attempt.outcome.error is None or not attempt.try_next:
                    return attempt.outcome
            assert attempt is not None, "a job request names at least one target"
            if attempt.out_of_time:  # the last target's retry would have waited past the deadline
                return clock.exceeded(request.targets[-1], request.request_type).outcome
            return attempt.outcome
        finally:
            if claim is not None:
                claim.release()

    def backoff_seconds(self, failed_calls: int, retry_after: float | None) -> float:
        settings = self._settings
        ceiling = min(settings.retry_max_backoff_seconds,
                      settings.retry_initial_backoff_seconds * 2 ** (failed_calls - 1))
        delay = random.uniform(ceiling / 2, ceiling)  # jitter spreads retries of a burst apart
        return min(max(delay, retry_after or 0.0), settings.retry_max_backoff_seconds)

    async def _call_with_retries(self, target: Target, request: JobRequest, on_retry: OnRetry | None,
                                 clock: JobClock, claim: Claim | None) -> Attempt:
        call = 1
        while True:
            if clock.remaining() <= 0:
                return clock.exceeded(target, request.request_type)
            attempt = await self._call(target, request, clock, claim)
            if attempt.outcome.error is not None:
                clock.last_failure = attempt.outcome.status_code
            if attempt.outcome.error is None or not attempt.retry_same or call >= self._settings.retry_max_attempts:
                return attempt
            delay = self.backoff_seconds(call, attempt.retry_after)
            if delay >= clock.remaining():
                # No point waiting for a call that could not start before the deadline.
                return replace(attempt, try_next=True, out_of_time=True)
            self._metrics.retries.labels(self._metrics.provider(target.provider)).inc()
            if on_retry is not None:
                await on_retry(RetryInfo(target=str(target), attempt=call, status_code=attempt.outcome.status_code,
                                         next_attempt_at=utcnow() + timedelta(seconds=delay)))
            await asyncio.sleep(delay)
            call += 1

    async def _measured(self, call: Awaitable[HttpResponse], provider: str,
                        request_type: RequestType) -> HttpResponse:
        """Await one HTTP call, counting it by provider and status, timing it, and holding it in
        the calls-in-flight gauge meanwhile."""
        metrics = self._metrics
        provider = metrics.provider(provider)
        in_flight = metrics.calls_in_flight.labels(provider)
        in_flight.inc()
        started = time.perf_counter()
        status = NO_ANSWER_UNREACHABLE
        try:
            reply = await call
            status = status_label(reply.status)
            return reply
        except HeaderNotSendable:
            status = NOT_SENT
            raise
        except (TimeoutError, asyncio.CancelledError):
            status = NO_ANSWER_TIMEOUT  # its own timeout, or the job's deadline (which cancels it)
            raise
        finally:
            in_flight.dec()
            metrics.calls.labels(provider, status).inc()
            metrics.call_duration.labels(provider, request_type.value).observe(time.perf_counter() - started)

    def _success(self, adapter, response: HttpResponse, target: Target, request: JobRequest) -> Attempt:
        rtype = request.request_type
        try:
            result = adapter.parse_result(rtype, response, model=target.model, body=request.body)
        except (ValueError, KeyError, TypeError, AttributeError):
            error = service_error(502, "unreadable provider response", "provider_response_error", target, rtype)
            return Attempt(Outcome(status_code=502, error=error), try_next=True)
        # Most results are small; only a large answer is measured against the stored maximum.
        if len(response.body) * 2 > self._settings.max_result_bytes and \
                len(orjson.dumps(result)) > self._settings.max_result_bytes:
            error = service_error(502, f"provider result too large: over {self._settings.max_result_bytes} bytes "
                                  "(FERRY_MAX_RESULT_BYTES)", "provider_response_error", target, rtype)
            return Attempt(Outcome(status_code=502, error=error), try_next=True)
        return Attempt(Outcome(status_code=200, result={**result, "extra_fields": _extra_fields(target, rtype)}))

    def limits_for(self, endpoint: ProviderEndpoint) -> ProviderLimits:
        """The provider's limits in this process (one set per provider, shared by all its calls)."""
        if endpoint.name not in self._limits:
            self._limits[endpoint.name] = ProviderLimits(endpoint)
        return self._limits[endpoint.name]

    async def _call(self, target: Target, request: JobRequest, clock: JobClock, claim: Claim | None) -> Attempt:
        """One call to one target, ended by the provider's timeout or the job's deadline."""
        rtype = request.request_type
        endpoint: ProviderEndpoint | None = self._settings.provider_endpoints.get(target.provider)
        if endpoint is None or rtype not in endpoint.request_types:
            # Configuration changed since the submit was accepted.
            error = service_error(400, f"provider {target.provider} is not configured for {rtype.value}",
                                  "invalid_request_error", target, rtype)
            return Attempt(Outcome(status_code=400, error=error), try_next=True)
        adapter = ADAPTERS[endpoint.family]
        try:
            http_request = adapter.build_request(endpoint, rtype, target.model, request.body, request.files)
        except (UnsupportedRequest, KeyError, TypeError, AttributeError) as exc:
            # A body the provider's API cannot express; another provider might.
            message = str(exc) if isinstance(exc, UnsupportedRequest) else \
                f"the request cannot be translated for {target.provider}: {type(exc).__name__}: {exc}"
            error = service_error(400, message, "invalid_request_error", target, rtype)
            return Attempt(Outcome(status_code=400, error=error), try_next=True)
        if self._session is None:
            await self.start()  # agents may take jobs before the worker's services have started
        session = self._session
        assert session is not None
        loop = asyncio.get_running_loop()
        at_deadline = True  # whether the bound in force is the job's deadline (else the provider's timeout)
        sent = False
        try:
            # The deadline bounds the wait for the provider's limits and the call; the call's
            # own bound is its provider's timeout, the whole call, when that ends sooner.
            async with asyncio.timeout_at(clock.deadline) as bound:
                async with self.limits_for(endpoint).call_slot(claim):
                    call_ends = loop.time() + endpoint.timeout_seconds
                    if call_ends < clock.deadline:
                        at_deadline = False
                        bound.reschedule(call_ends)
                    clock.calls += 1
                    sent = True
                    response = await self._measured(send(session, http_request), target.provider, rtype)
        except TimeoutError as exc:
            # The bound above is the deadline or the provider's timeout; aiohttp's own (a connect
            # that took too long) is a ClientError.
            if at_deadline and not isinstance(exc, aiohttp.ClientError):
                if sent:
                    clock.last_failure = None  # the call was cut short, it did not fail
                return clock.exceeded(target, rtype)
            error = service_error(504, "provider request timed out", "timeout_error", target, rtype)
            return Attempt(Outcome(status_code=504, error=error), retry_same=True, try_next=True)
        except HeaderNotSendable:
            # Not sent: a header is not valid HTTP (or not ASCII), in practice a provider key with
            # a stray newline, space or quote.
            log.warning("provider %s: request not sent, a header is not valid HTTP (check the provider key)",
                        target.provider)
            error = service_error(500, f"the request could not be sent to {target.provider}: a request header is "
                                  "not valid HTTP (check the provider key)", "configuration_error", target, rtype)
            return Attempt(Outcome(status_code=500, error=error), try_next=True)
        except aiohttp.ClientError as exc:
            log.warning("provider %s unreachable: %s", target.provider, type(exc).__name__)
            error = service_error(502, "could not reach provider", "connection_error", target, rtype)
            return Attempt(Outcome(status_code=502, error=error), retry_same=True, try_next=True)
        if 200 <= response.status < 300:
            return self._success(adapter, response, target, request)
        failure = adapter.parse_failure(response)
        return Attempt(Outcome(status_code=failure.status_code, error=provider_error(failure, target, rtype)),
                       retry_same=failure.retryable, try_next=failure.retryable,
                       retry_after=failure.retry_after_seconds)
