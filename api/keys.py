"""Reading the caller's service key, which decides who may poll a job."""

from __future__ import annotations

from aiohttp import web

from api.errors import bad_request

SERVICE_KEY_PREFIX = "sk-bf-"


def _service_key(value: str | None) -> str | None:
    if value and value[: len(SERVICE_KEY_PREFIX)].lower() == SERVICE_KEY_PREFIX:
        return value
    return None


def _given_key(request: web.Request) -> str | None:
    if request.headers.get("x-bf-vk"):
        return request.headers["x-bf-vk"]
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and _service_key(token.strip()):
        return token.strip()
    return _service_key(request.headers.get("x-api-key")) or _service_key(request.headers.get("x-goog-api-key"))


def service_key(request: web.Request) -> str | None:
    """The key from ``x-bf-vk``, else an ``sk-bf-`` key in Authorization, x-api-key or x-goog-api-key.

    aiohttp decodes header values as UTF-8 with ``surrogateescape``: a byte that is not UTF-8
    arrives as a lone surrogate, which no key fingerprint (a SHA-256 of the key's UTF-8) can be
    made of. Such a key is refused with 400, as Bifrost does.
    """
    key = _given_key(request)
    if key is not None:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("invalid service key: not valid UTF-8") from None
    return key
