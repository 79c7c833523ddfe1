"""The API's ``/metrics`` page, and the middleware that counts every answer (app/metrics.py)."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler

from api.errors import JOB_ID_HEADER
from api.openapi import OPENAPI_PATH
from api.routes import PATHS
from app.jobs import RequestType
from app.metrics import ApiMetrics

METRICS = web.AppKey("metrics", ApiMetrics)

# Route (its canonical path) -> the operation and request type its answers are counted under.
_ROUTES: dict[str, tuple[str, RequestType | None]] = {
    **{f"/v1/async/{path}": ("submit", request_type) for request_type, path in PATHS.items()},
    **{f"/v1/async/{path}/{{job_id}}": ("poll", request_type) for request_type, path in PATHS.items()},
    "/health": ("health", None), "/health/live": ("health", None), "/health/ready": ("health", None),
    "/metrics": ("metrics", None), OPENAPI_PATH: ("openapi", None),
}


def _operation(request: web.Request) -> tuple[str, RequestType | None]:
    resource = request.match_info.route.resource
    if resource is None:  # no route matched: aiohttp's 404 or 405
        return "other", None
    return _ROUTES.get(resource.canonical, ("other", None))


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts each answer by operation and status, and each submit as accepted or refused.

    Outermost: error_middleware inside it has already made every error an answer."""
    started = time.perf_counter()
    response = await handler(request)
    operation, request_type = _operation(request)
    # A 503 naming a job: Kafka did not confirm the publish in time, so it may be queued.
    uncertain = response.status == 503 and JOB_ID_HEADER in response.headers
    request.app[METRICS].count_answer(operation, request_type, response.status, time.perf_counter() - started,
                                      uncertain)
    return response


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})
