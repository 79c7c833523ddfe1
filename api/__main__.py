"""Starts the API process: ``python -m api``."""

from __future__ import annotations

import asyncio
import logging
import signal

from api.connections import ConnectionLimits, raise_open_file_limit, serve
from api.server import LISTEN_BACKLOG, create_api
from app.kafka_clients import verify_connection
from app.runtime import freeze_start_up_objects, tune_garbage_collector, use_uvloop
from app.settings import Settings

log = logging.getLogger("api")


def main() -> None:
    settings = Settings()
    use_uvloop()
    tune_garbage_collector()
    from app.logs import configure_logging
    configure_logging(settings)
    settings.require_bootstrap_servers()
    asyncio.run(run(settings))


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (aiohttp's run_app, whose runner
    cannot be given the connection guard): stop listening, close idle connections, let
    requests in flight finish (up to 60 s), then stop the app's Kafka clients."""
    # Wrong TLS or SASL settings end the process here, in one line, rather than in retries.
    await verify_connection(settings)
    open_file_limit = raise_open_file_limit()
    limits = ConnectionLimits.from_settings(settings, open_file_limit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    api = create_api(settings)
    freeze_start_up_objects()
    runner, port = await serve(api, limits, settings.api_host, settings.api_port, backlog=LISTEN_BACKLOG)
    log.info("API listening on %s:%d, at most %d connections (open-file limit %d)", settings.api_host, port,
             limits.max_connections, open_file_limit)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
