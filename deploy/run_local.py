"""Runs Ferry locally in the foreground (`make run`): Kafka, the API, one worker, a fake provider.

The fake OpenAI-compatible provider (``deploy/fakes/openai_server.py``) listens on
``http://127.0.0.1:8099/v1``. When no provider is configured (``FERRY_PROVIDERS`` unset), it is
configured as the provider ``fake``, so ``"model": "fake/gpt-4o-mini"`` works without any key.

Ctrl-C (or SIGTERM) stops the API and the worker, then the local broker if this command
started it. If either process dies, the others are stopped too and the exit code says so.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from app.logs import configure_logging
from app.settings import Settings
from deploy.kafka.locate import locate

log = logging.getLogger("ferry.run")

FAKE_PROVIDER_PORT = 8099


def _stop(processes: dict[str, subprocess.Popen], timeout: float = 20.0) -> None:
    for proc in processes.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, proc in processes.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, timeout)
            proc.kill()
            proc.wait()


def main() -> int:
    settings = Settings()
    configure_logging(settings)  # as the API and the worker it starts do
    broker = locate(settings)
    log.info("Kafka (%s) at %s", broker.source, broker.bootstrap_servers)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    if not settings.providers:
        env["FERRY_PROVIDERS"] = json.dumps({"fake": {"base_url": f"http://127.0.0.1:{FAKE_PROVIDER_PORT}/v1"}})
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    processes: dict[str, subprocess.Popen] = {}
    exit_code = 0
    try:
        commands = {
            "fake provider": ["deploy.fakes.openai_server", "--port", str(FAKE_PROVIDER_PORT)],
            "api": ["api"],
            "worker": ["workers"],
        }
        for name, args in commands.items():
            # Own process groups: Ctrl-C reaches this supervisor only, which stops them in order.
            processes[name] = subprocess.Popen([sys.executable, "-m", *args], env=env, start_new_session=True)
        log.info("API on http://%s:%d — Ctrl-C stops everything", settings.api_host, settings.api_port)
        while not stopping:
            for name, proc in processes.items():
                if proc.poll() is not None:
                    log.error("%s exited with %s; stopping the rest", name, proc.returncode)
                    exit_code = proc.returncode or 1
                    stopping = True
            time.sleep(0.2)
    finally:
        _stop(processes)
        broker.release()
        log.info("stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
