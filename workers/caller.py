"""Calling providers: the only module that does provider network I/O (httpx).

``ProviderCaller.run(request)`` tries the job's targets in order (primary, then fallbacks) and
returns its ``Outcome``. A target's failure moves on to the next target only when it is
retryable (429, 5xx, timeout, connection failure); any other failure ends the job.

Errors, and who they are blamed on (``is_bifrost_error``):

    provider answered non-2xx    -> its status code, its message     (False: the provider's)
    provider timed out           -> 504 "provider request timed out" (True)
    provider unreachable         -> 502 "could not reach provider"   (True)
    provider 2xx, unreadable     -> 502 "unreadable provider response" (True)
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from app.jobs import ErrorDetail, ErrorObject, JobRequest, Outcome, RequestType, Target
from app.providers import ProviderEndpoint
from app.settings import Settings
from workers.providers import ADAPTERS
from workers.providers.base import HttpResponse, ProviderFailure

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


class ProviderCaller:
    """Owns the process's shared httpx client; started and stopped once."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self._settings.http_max_connections,
                              max_keepalive_connections=self._settings.http_max_connections,
                              keepalive_expiry=30.0)
        timeout = httpx.Timeout(self._settings.provider_timeout_seconds,
                                connect=self._settings.http_connect_timeout_seconds)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, transport=self._transport,
                                         follow_redirects=False)

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def run(self, request: JobRequest) -> Outcome:
        """The job's outcome after trying its targets in order."""
        outcome: Outcome | None = None
        for target in request.targets:
            outcome, retryable = await self._call(target, request)
            if outcome.error is None or not retryable:
                return outcome
        return outcome

    async def _call(self, target: Target, request: JobRequest) -> tuple[Outcome, bool]:
        """One target's outcome, and whether another target might do better."""
        rtype = request.request_type
        endpoint: ProviderEndpoint | None = self._settings.provider_endpoints.get(target.provider)
        if endpoint is None or rtype not in endpoint.request_types:
            # Configuration changed since the submit was accepted.
            error = service_error(400, f"provider {target.provider} is not configured for {rtype.value}",
                                  "invalid_request_error", target, rtype)
            return Outcome(status_code=400, error=error), True
        adapter = ADAPTERS[endpoint.family]
        http_request = adapter.build_request(endpoint, rtype, target.model, request.body)
        try:
            reply = await self._client.request(
                http_request.method, http_request.url, headers=http_request.headers, json=http_request.json,
                timeout=httpx.Timeout(endpoint.timeout_seconds, connect=self._settings.http_connect_timeout_seconds),
            )
        except httpx.TimeoutException:
            error = service_error(504, "provider request timed out", "timeout_error", target, rtype)
            return Outcome(status_code=504, error=error), True
        except httpx.TransportError as exc:
            log.warning("provider %s unreachable: %s", target.provider, type(exc).__name__)
            error = service_error(502, "could not reach provider", "connection_error", target, rtype)
            return Outcome(status_code=502, error=error), True
        response = HttpResponse(reply.status_code, reply.headers, reply.content)
        if 200 <= reply.status_code < 300:
            try:
                return Outcome(status_code=200, result=adapter.parse_result(rtype, response)), False
            except ValueError:
                error = service_error(502, "unreadable provider response", "provider_response_error", target, rtype)
                return Outcome(status_code=502, error=error), True
        failure = adapter.parse_failure(response)
        return Outcome(status_code=failure.status_code, error=provider_error(failure, target, rtype)), failure.retryable
