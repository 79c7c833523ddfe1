"""Starts a worker process: ``python -m workers``."""

from __future__ import annotations

import faust

from app.faust_app import create_app
from app.settings import Settings


def main() -> None:
    settings = Settings()
    app = create_app(settings)

    @app.page("/health")
    async def health(web, request):
        return web.json({"status": "ok"})

    worker = faust.Worker(app, loglevel=settings.log_level)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
