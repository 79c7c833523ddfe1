"""Reading the caller's service key, which decides who may poll a job."""

from __future__ import annotations

from aiohttp import web

SERVICE_KEY_PREFIX = "sk-bf-"


def _service_key(value: str | None) -> str | None:
    if value and value[: len(SERVICE_KEY_PREFIX)].lower() == SERVICE_KEY_PREFIX:
        return value
    return None


def service_key(request: web.Request) -> str | None:
    """The key from ``x-bf-vk``, else an ``sk-bf-`` key in Authorization, x-api-key or x-goog-api-key."""
    if request.headers.get("x-bf-vk"):
        return request.headers["x-bf-vk"]
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and _service_key(token.strip()):
        return token.strip()
    return _service_key(request.headers.get("x-api-key")) or _service_key(request.headers.get("x-goog-api-key"))
