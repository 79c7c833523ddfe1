"""Ferry processes started the way operators start them (``python -m ...``), for the tests
that kill them and the benchmarks that measure them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pydantic import SecretStr

from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process build these same settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FERRY_")}
    for name, value in settings.model_dump(exclude={"providers", "kafka_bootstrap_servers"}).items():
        if value is None:
            continue  # unset stays unset ("None" would be read as a value)
        env[f"FERRY_{name.upper()}"] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    if settings.kafka_bootstrap_servers is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    providers = {
        name: {key: (value.get_secret_value() if isinstance(value, SecretStr) else value)
               for key, value in config if value is not None}
        for name, config in settings.providers.items()
    }
    env["FERRY_PROVIDERS"] = json.dumps(providers)
    env.update(extra)
    return env


class FerryProcess:
    """``python -m <module> [args]`` with these settings; killed or stopped by its owner."""

    def __init__(self, module: str, settings: Settings, workdir: Path, *args: str, **extra_env: str) -> None:
        self.module = module
        self.args = list(args)
        # The caller's extra_env wins over these defaults (a test may want FERRY_LOG_LEVEL=INFO).
        defaults = {"FERRY_WORKER_WEB_PORT": str(free_port()), "FERRY_WORKER_DATA_DIR": str(workdir / "faust"),
                    "FERRY_LOG_LEVEL": "WARNING"}
        self.env = settings_env(settings, **(defaults | extra_env))
        self.web_port = int(self.env["FERRY_WORKER_WEB_PORT"])
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> FerryProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"{self.module}.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", self.module, *self.args], env=self.env, cwd=REPO_ROOT,
                                        stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed, nothing committed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout: float = 60) -> int:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout)
        return self.process.returncode if self.process else 0
