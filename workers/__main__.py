"""Starts a worker process: ``python -m workers``."""

from __future__ import annotations

import asyncio

import faust

from app.event_loop import use_uvloop
from app.settings import Settings
from app.topics import declare_topics
from workers.app import FerryWorker


def main() -> None:
    use_uvloop()
    settings = Settings()
    settings.require_bootstrap_servers()
    asyncio.run(declare_topics(settings))
    worker = FerryWorker(settings)
    process = faust.Worker(worker.app, loglevel=settings.log_level)
    # Faust's start-up spinner sets the root logger to DEBUG whenever the level is WARNING or
    # above, so every debug call in aiokafka and httpcore builds a record that is then dropped
    # (about a tenth of the worker's CPU under load). Ferry logs to files and pods, not a TTY.
    process.spinner = None
    process.execute_from_commandline()


if __name__ == "__main__":
    main()
