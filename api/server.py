"""The aiohttp application: routes, and the lifecycle of what the handlers share."""

from __future__ import annotations

from aiohttp import web

from app.settings import Settings

SETTINGS = web.AppKey("settings", Settings)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_api(settings: Settings) -> web.Application:
    api = web.Application()
    api[SETTINGS] = settings
    api.router.add_get("/health", health)
    return api
