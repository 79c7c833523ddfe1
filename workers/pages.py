"""The worker's web pages: ``/health`` (counters), ``/health/ready`` and ``/metrics``.

Faust's own views are left out (``workers/faust_layer/app.py``): job data is served only by the
API, behind its key checks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.jobs import RequestType
from app.metrics import WorkerSnapshot
from app.topics import request_topic
from workers.faust_layer import recovered, uncommitted_requests

if TYPE_CHECKING:
    from workers.app import FerryWorker

log = logging.getLogger(__name__)


def register_pages(worker: FerryWorker) -> None:
    app = worker.app
    types = {request_topic(worker.settings, request_type): request_type for request_type in RequestType}

    def consumer_lag() -> dict[RequestType, int]:
        try:
            return {types[topic]: lag for topic, lag in uncommitted_requests(app, set(types)).items()}
        except Exception as exc:  # a scrape while the consumer starts or stops: no lag to report
            log.debug("consumer lag not available: %s", type(exc).__name__)
            return {}

    def snapshot() -> WorkerSnapshot:
        counters = worker.counters()
        return WorkerSnapshot(jobs_in_flight=counters["in_flight"], jobs_waiting=worker.lanes.waiting(),
                              possible_duplicate_calls=counters["possible_duplicate_calls"],
                              duplicate_outcomes=counters["duplicate_outcomes"],
                              dead_lettered_jobs=counters["poisoned_jobs"], consumer_lag=consumer_lag())

    worker.metrics.watch(snapshot)

    # Faust makes each function the ``get`` method of a view class: called with the view first.
    async def health(view, request):
        return app.web.json({"status": "ok", **worker.counters()})

    async def ready(view, request):
        """Ready when in the group with a settled, recovered and noted assignment, and not stopping."""
        is_ready = (not app.rebalancing and not worker.runner.stopping and app.consumer is not None
                    and recovered(app) and worker.assignment_noted)
        return app.web.json({"status": "ok" if is_ready else "unavailable"}, status=200 if is_ready else 503)

    async def metrics(view, request):
        body, content_type = worker.metrics.render()
        return app.web.bytes(body, headers={"Content-Type": content_type})

    app.page("/health")(health)
    app.page("/health/ready")(ready)
    app.page("/metrics")(metrics)
