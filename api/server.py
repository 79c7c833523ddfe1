"""The aiohttp application: routes, health, and the lifecycle of what the handlers share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from api.answers import json_answer
from api.connections import body_deadline, handler_args
from api.errors import error_middleware
from api.metrics import METRICS, metrics_middleware, metrics_page
from api.openapi import add_openapi_route
from api.publisher import JobPublisher
from api.read_model import JobReadModel
from api.routes import PUBLISHER, READ_MODEL, SETTINGS, add_job_routes
from app.metrics import ApiMetrics
from app.settings import Settings
from app.topics import declare_topics

# Connections the listening socket queues before they are accepted (the kernel caps it at
# net.core.somaxconn). aiohttp's default of 128 overflows under a burst of clients, and each
# refused connection attempt waits for TCP's retransmission: a second or more.
LISTEN_BACKLOG = 4096


async def live(request: web.Request) -> web.Response:
    return json_answer({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when a submit can be published now and the view of the jobs table has caught up
    and can still read from Kafka: each is asked of Kafka, not remembered from the start."""
    kafka, table = await asyncio.gather(request.app[PUBLISHER].ready(), request.app[READ_MODEL].ready())
    body = {"status": "ok" if kafka and table else "unavailable", "kafka": kafka, "table_caught_up": table}
    return json_answer(body, status=200 if kafka and table else 503)


async def _lifecycle(api: web.Application) -> AsyncIterator[None]:
    settings = api[SETTINGS]
    await declare_topics(settings, used_by="api")
    await api[PUBLISHER].start()
    await api[READ_MODEL].start()
    yield
    await api[READ_MODEL].stop()
    await api[PUBLISHER].stop()


def create_api(settings: Settings) -> web.Application:
    """The app; ``api.connections.serve`` runs it with the connection guard (``python -m api``
    does), which aiohttp's TestServer does not: there only the body deadline, the keep-alive
    bound and the access-log choice apply, set here."""
    body_deadline_middleware = body_deadline(settings.api_body_timeout_seconds,
                                             settings.api_body_min_rate_bytes_per_second)
    api = web.Application(client_max_size=max(settings.max_request_bytes, settings.max_upload_bytes),
                          middlewares=[metrics_middleware, error_middleware, body_deadline_middleware],
                          handler_args=handler_args(settings))
    api[SETTINGS] = settings
    api[PUBLISHER] = JobPublisher(settings)
    api[READ_MODEL] = JobReadModel(settings)
    api.cleanup_ctx.append(_lifecycle)
    api.router.add_get("/health", live)
    api.router.add_get("/health/live", live)
    api.router.add_get("/health/ready", ready)
    api[METRICS] = ApiMetrics()
    api.router.add_get("/metrics", metrics_page)
    add_job_routes(api)
    add_openapi_route(api)
    return api
