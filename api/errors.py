"""Errors the API answers with, rendered in the contract's error shape in one place."""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from api.answers import json_answer
from app.jobs import ErrorDetail, ErrorObject

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses: an HTTP status and the contract's error object."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, close_connection: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}
        # For a request whose rest cannot be read (a broken or too slow body): answer, then close.
        self.close_connection = close_connection

    def to_error_object(self) -> ErrorObject:
        return ErrorObject(
            is_bifrost_error=True, status_code=self.status,
            error=ErrorDetail(message=self.message, type=self.error_type),
        )

    def to_response(self) -> web.Response:
        response = json_answer(self.to_error_object().to_json_dict(), status=self.status, headers=self.headers)
        if self.close_connection:
            response.force_close()
        return response

    def to_http_bytes(self) -> bytes:
        """The whole HTTP/1.1 answer, closing the connection, for the connection guard
        (api/connections.py) to write where no request object exists (a request cut off while
        its headers were still arriving)."""
        body = json.dumps(self.to_error_object().to_json_dict()).encode()
        head = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
                "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}",
                "Connection: close", *(f"{name}: {value}" for name, value in self.headers.items())]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def too_large(limit: int) -> ApiError:
    # The rest of the body is not read: the connection closes after the answer.
    return ApiError(413, f"request body too large: the limit is {limit} bytes", error_type="request_too_large",
                    close_connection=True)


def not_found(message: str = "job not found or expired") -> ApiError:
    return ApiError(404, message, error_type="not_found_error")


# Names the job of a submit whose fate Kafka did not confirm in time.
JOB_ID_HEADER = "x-bf-async-job-id"


def unavailable(message: str, retry_after_seconds: int, job_id: str | None = None) -> ApiError:
    """503 with ``Retry-After``; ``job_id`` names a job that may exist after all (see
    api/publisher.py), in the ``x-bf-async-job-id`` header."""
    headers = {"Retry-After": str(retry_after_seconds)}
    if job_id is not None:
        headers[JOB_ID_HEADER] = job_id
    return ApiError(503, message, error_type="service_unavailable", headers=headers)



def headers_timeout(seconds: float) -> ApiError:
    return ApiError(408, f"request headers not received within {seconds:g} s", error_type="request_timeout",
                    close_connection=True)


def body_timeout(seconds: float, min_rate: int) -> ApiError:
    return ApiError(408, f"request body too slow: it may take {seconds:g} s plus one second per {min_rate} bytes",
                    error_type="request_timeout", close_connection=True)


def over_connection_limit() -> ApiError:
    return ApiError(503, "the server is at its connection limit, retry later", error_type="service_unavailable",
                    headers={"Retry-After": "1"}, close_connection=True)


def client_went_away() -> ApiError:
    """For a request whose client hung up: never delivered, but the access log shows a 4xx, not a 500."""
    return ApiError(400, "the client closed the connection before the request was answered", close_connection=True)


# llhttp's reasons ("Invalid character in chunk size") are plain words; anything else in a parser
# message may quote the client's bytes (a header holding a key), which are never echoed or logged.
_PARSER_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,-]{0,79}")


# aiohttp's parser errors, by type (subclasses before their bases), and what the answer says.
_PARSER_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (BadStatusLine, "malformed request line"),
    (InvalidURLError, "malformed request target"),
    (InvalidHeader, "malformed request header"),
    (TransferEncodingError, "malformed chunked request body"),
    (ContentLengthError, "request body shorter than its Content-Length"),
    (ContentEncodingError, "request body cannot be decoded with its Content-Encoding"),
    (RequestPayloadError, "malformed request body"),
)


def malformed_request(exc: BaseException | None, status: int = 400) -> ApiError:
    """The answer to a request aiohttp's HTTP parser refused, naming what was wrong without
    quoting the request (aiohttp's own text repeats the offending bytes)."""
    return ApiError(status if 400 <= status < 500 else 400, _parser_error_message(exc), close_connection=True)


def _parser_error_message(exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        return "a request line or header line is too long" + (f" (the limit is {limit} bytes)" if limit else "")
    if isinstance(exc, BadHttpMethod):
        https = exc.message == "Received HTTPS traffic on an HTTP port"
        return "HTTPS traffic on an HTTP port" if https else "malformed request line: invalid method"
    for kind, message in _PARSER_ERRORS:
        if isinstance(exc, kind):
            return message
    reason = exc.message.splitlines()[0].rstrip(":").strip() if isinstance(exc, HttpProcessingError) else ""
    if _PARSER_REASON.fullmatch(reason) and reason != "Bad Request":
        return f"malformed HTTP request: {reason}"
    return "malformed HTTP request"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every non-2xx answer in the contract's shape, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.to_response()
    except web.HTTPRequestEntityTooLarge as exc:
        return ApiError(413, f"request body too large: {exc.text}", error_type="request_too_large",
                        close_connection=True).to_response()
    except web.HTTPNotFound:
        return ApiError(404, f"no route for {request.method} {request.path}",
                        error_type="not_found_error").to_response()
    except web.HTTPMethodNotAllowed as exc:
        return ApiError(405, f"method {request.method} is not allowed on {request.path}",
                        error_type="invalid_request_error",
                        headers={"Allow": ", ".join(sorted(exc.allowed_methods))}).to_response()
    except web.HTTPException as exc:
        return ApiError(exc.status, exc.reason, error_type="http_error").to_response()
    except (ConnectionError, HttpProcessingError, RequestPayloadError) as exc:
        if request.transport is None:
            # The client hung up (mid-body, say): nothing to answer and nothing wrong with the server.
            log.info("client closed the connection before %s %s was answered (%s)", request.method, request.path,
                     type(exc).__name__)
            return client_went_away().to_response()
        if not isinstance(exc, ConnectionError):
            return malformed_request(exc).to_response()  # a broken body: chunked encoding, gzip
        return _internal_error(request)
    except Exception:
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.Response:
    log.exception("unexpected error answering %s %s", request.method, request.path)
    return ApiError(500, "internal server error", error_type="internal_error").to_response()
