"""Errors the API answers with, rendered in the contract's error shape in one place."""

from __future__ import annotations

import logging

from aiohttp import web

from app.jobs import ErrorDetail, ErrorObject

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses: an HTTP status and the contract's error object."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}

    def to_error_object(self) -> ErrorObject:
        return ErrorObject(
            is_bifrost_error=True, status_code=self.status,
            error=ErrorDetail(message=self.message, type=self.error_type),
        )

    def to_response(self) -> web.Response:
        return web.json_response(self.to_error_object().to_json_dict(), status=self.status, headers=self.headers)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body too large: the limit is {limit} bytes", error_type="request_too_large")


def not_found(message: str = "job not found or expired") -> ApiError:
    return ApiError(404, message, error_type="not_found_error")


def unavailable(message: str, retry_after_seconds: int) -> ApiError:
    return ApiError(503, message, error_type="service_unavailable",
                    headers={"Retry-After": str(retry_after_seconds)})


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every non-2xx answer in the contract's shape, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.to_response()
    except web.HTTPRequestEntityTooLarge as exc:
        return ApiError(413, f"request body too large: {exc.text}", error_type="request_too_large").to_response()
    except web.HTTPNotFound:
        return ApiError(404, f"no route for {request.method} {request.path}",
                        error_type="not_found_error").to_response()
    except web.HTTPMethodNotAllowed as exc:
        return ApiError(405, f"method {request.method} is not allowed on {request.path}",
                        error_type="invalid_request_error",
                        headers={"Allow": ", ".join(sorted(exc.allowed_methods))}).to_response()
    except web.HTTPException as exc:
        return ApiError(exc.status, exc.reason, error_type="http_error").to_response()
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return ApiError(500, "internal server error", error_type="internal_error").to_response()
