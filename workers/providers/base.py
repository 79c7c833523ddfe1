"""What a provider adapter is: pure translation between Ferry's jobs and a provider's HTTP API.

An adapter never does I/O. It turns a job's request into an ``HttpRequest``, and a provider's
``HttpResponse`` back into a result (an OpenAI-format dict) or a ``ProviderFailure``. The one
module that talks to the network is ``workers/caller.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from app.jobs import RequestType
from app.providers import ProviderEndpoint


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str] = field(repr=False)  # carries the provider key
    json: Any = None


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class ProviderFailure:
    """A provider's refusal, read from its status code and structured error body."""

    status_code: int
    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    retry_after_seconds: float | None = None

    @property
    def retryable(self) -> bool:
        """429 and 5xx may succeed later or elsewhere; other 4xx will not."""
        return self.status_code == 429 or self.status_code >= 500


class ProviderAdapter(Protocol):
    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any]) -> HttpRequest: ...

    def parse_result(self, request_type: RequestType, response: HttpResponse) -> dict[str, Any]: ...

    def parse_failure(self, response: HttpResponse) -> ProviderFailure: ...


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (delta-seconds form); an HTTP date or garbage reads as None."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
