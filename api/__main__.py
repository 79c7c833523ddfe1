"""Starts the API process: ``python -m api``."""

from __future__ import annotations

import logging

from aiohttp import web

from api.server import LISTEN_BACKLOG, create_api
from app.event_loop import use_uvloop
from app.settings import Settings


def main() -> None:
    settings = Settings()
    use_uvloop()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.require_bootstrap_servers()
    web.run_app(create_api(settings), host=settings.api_host, port=settings.api_port, print=None,
                backlog=LISTEN_BACKLOG)


if __name__ == "__main__":
    main()
