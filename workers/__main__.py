"""Starts a worker process: ``python -m workers``."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from typing import IO

import faust

from app.kafka_clients import verify_connection
from app.logs import configure_logging
from app.runtime import freeze_start_up_objects, tune_garbage_collector, use_uvloop
from app.settings import Settings
from app.topics import declare_topics
from workers.app import FerryWorker

LOCK_FILE = "worker.lock"
OWN_PLACE = "give this worker its own FERRY_WORKER_DATA_DIR and FERRY_WORKER_WEB_PORT"


def claim_data_dir(data_dir: str) -> IO[str]:
    """An exclusive lock on ``data_dir``, held until the returned file is closed or the process
    ends (the kernel releases it even on SIGKILL); exits at once if another worker holds it.

    Two workers in one data dir would share RocksDB files: the second one crashed half a minute
    into its start on RocksDB's own lock, with an error that did not say what to change.
    """
    os.makedirs(data_dir, exist_ok=True)
    lock = open(os.path.join(data_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise SystemExit(f"another worker uses {data_dir} (locked by pid {holder}): {OWN_PLACE}") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def check_web_port(host: str, port: int) -> None:
    """Exits at once if the worker's web port is taken (Faust would fail on it only later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As aiohttp binds: a port left in TIME_WAIT by a worker that just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise SystemExit(f"port {port} ({host}) is taken, perhaps by another worker: {OWN_PLACE}") from None


def main() -> None:
    use_uvloop()
    tune_garbage_collector()
    settings = Settings()
    configure_logging(settings)
    settings.require_bootstrap_servers()
    # Before anything starts: a second worker on one machine fails here, saying what to set.
    data_dir_lock = claim_data_dir(settings.worker_data_dir)
    check_web_port(settings.worker_web_host, settings.worker_web_port)
    # Wrong TLS or SASL settings end the process here, in one line, rather than in Faust's retries.
    asyncio.run(verify_connection(settings))
    asyncio.run(declare_topics(settings, used_by="worker"))
    worker = FerryWorker(settings)
    # Logging is configured above (app/logs.py), for this process as for the API.
    process = faust.Worker(worker.app, loglevel=settings.log_level, override_logging=False)
    # Faust's start-up spinner writes to stdout and, when Faust configures logging, sets the root
    # logger to DEBUG; Ferry logs to files and pods, not a TTY.
    process.spinner = None
    freeze_start_up_objects()
    try:
        process.execute_from_commandline()
    finally:
        data_dir_lock.close()


if __name__ == "__main__":
    main()
