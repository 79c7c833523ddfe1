"""What a provider adapter is: pure translation between Ferry's jobs and a provider's HTTP API.

An adapter never does I/O. It turns a job's request into an ``HttpRequest``, and a provider's
``HttpResponse`` back into a result (an OpenAI-format dict) or a ``ProviderFailure``. The one
module that talks to the network is ``workers/caller.py``.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from app.jobs import RequestType, UploadedFile
from app.providers import ProviderEndpoint

# A multipart file part: (form field, (filename, bytes, content type))
FilePart = tuple[str, tuple[str, bytes, str]]


@dataclass(frozen=True)
class HttpRequest:
    """What to send: a JSON body (``json``), or a multipart form (``data`` and ``files``)."""

    method: str
    url: str
    headers: Mapping[str, str] = field(repr=False)  # carries the provider key
    json: Any = None
    data: Mapping[str, Any] | None = None
    files: Sequence[FilePart] | None = None


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


class UnsupportedRequest(ValueError):
    """A request the provider's API cannot express (a content part it has no equivalent for);
    the job fails with 400 without a call."""


class ProviderAdapter(Protocol):
    """``parse_result`` gets the target's model and the job's body for answers that lack what
    the OpenAI-format result needs (Gemini's embeddings name no model, Cohere's rerank no
    documents)."""

    def build_request(self, endpoint: ProviderEndpoint, request_type: RequestType, model: str,
                      body: Mapping[str, Any], files: Sequence[UploadedFile] = ()) -> HttpRequest: ...

    def parse_result(self, request_type: RequestType, response: HttpResponse, *, model: str,
                     body: Mapping[str, Any]) -> dict[str, Any]: ...

    def parse_failure(self, response: HttpResponse) -> ProviderFailure: ...


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by its lower-case name, whatever case the mapping uses (the HTTP client's is insensitive)."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if isinstance(value, str) else None


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """How long the provider asks to wait before the next call, in seconds; None when it does not say.

    - ``retry-after-ms`` (OpenAI, Azure OpenAI): milliseconds; preferred when present, being
      the more precise;
    - ``Retry-After`` (RFC 9110 10.2.3): delta-seconds, or an HTTP-date (IMF-fixdate, and the
      obsolete forms ``email.utils`` reads); a date in the past is 0.

    Negative numbers read as 0; a value that is none of these is ignored (None). ``now`` is the
    moment the date is measured from (default: the current time).
    """
    millis = _header(headers, "retry-after-ms")
    if millis:
        try:
            milliseconds = float(millis)
            if math.isfinite(milliseconds):
                return max(0.0, milliseconds / 1000)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # "-0000" and the obsolete forms: GMT (RFC 9110 5.6.7)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def json_headers(key_header: str, key: str | None, key_prefix: str = "") -> dict[str, str]:
    """Headers of a JSON call authenticated by ``key_header: <key_prefix><key>`` (when keyed)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers[key_header] = key_prefix + key
    return headers


def json_object(response: HttpResponse) -> dict[str, Any]:
    """A 2xx body that must be a JSON object; ``ValueError`` otherwise (the caller's 502)."""
    result = orjson.loads(response.body)
    if not isinstance(result, dict):
        raise ValueError("the provider answered 2xx with a body that is not a JSON object")
    return result


def json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def text_failure(response: HttpResponse, message: Any = None) -> ProviderFailure:
    """A failure whose body had no structured error: its text, or the status, as the message."""
    text = str(message) if message else response.body[:500].decode(errors="replace").strip()
    return ProviderFailure(status_code=response.status, message=text or f"provider answered {response.status}",
                           retry_after_seconds=retry_after_seconds(response.headers))
