"""Starts a worker process: ``python -m workers``."""

from __future__ import annotations

import asyncio

import faust

from app.settings import Settings
from app.topics import declare_topics
from workers.app import FerryWorker


def main() -> None:
    settings = Settings()
    settings.require_bootstrap_servers()
    asyncio.run(declare_topics(settings))
    worker = FerryWorker(settings)
    faust.Worker(worker.app, loglevel=settings.log_level).execute_from_commandline()


if __name__ == "__main__":
    main()
