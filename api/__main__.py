"""Starts the API process: ``python -m api``."""

from __future__ import annotations

import logging

from aiohttp import web

from api.server import create_api
from app.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.require_bootstrap_servers()
    web.run_app(create_api(settings), host=settings.api_host, port=settings.api_port, print=None)


if __name__ == "__main__":
    main()
