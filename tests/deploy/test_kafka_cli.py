"""`python -m deploy.kafka`: a status query answers (exit 0) whether or not the broker runs,
while a start that cannot start still fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from deploy.processes import REPO_ROOT, free_port


def kafka_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FERRY_")} | env
    return subprocess.run([sys.executable, "-m", "deploy.kafka", *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_status_of_a_broker_that_is_not_running_is_an_answer_not_a_failure() -> None:
    # The default home: the shared test broker may run there, on its own port, not on this one.
    port = free_port()
    result = kafka_cli("status", FERRY_LOCAL_KAFKA_PORT=str(port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("not running"), result.stdout
    assert "running, pid" not in result.stdout


def test_status_in_a_home_where_no_broker_ever_ran(tmp_path: Path) -> None:
    result = kafka_cli("status", "--home", str(tmp_path / "kafka"), FERRY_LOCAL_KAFKA_PORT=str(free_port()))
    assert (result.returncode, result.stdout) == (0, "not running\n"), result.stderr


def test_a_start_that_cannot_start_still_fails(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = kafka_cli("start", "--home", str(tmp_path / "kafka"), FERRY_LOCAL_KAFKA_PORT=str(port))
    assert result.returncode == 1
    assert f"error: port {port} or {port + 1} is taken" in result.stderr


def test_cluster_status_in_a_home_where_no_cluster_ever_ran(tmp_path: Path) -> None:
    result = kafka_cli("cluster", "status", "--home", str(tmp_path / "cluster"),
                       FERRY_LOCAL_KAFKA_CLUSTER_PORT=str(free_port()))
    assert (result.returncode, result.stdout) == (0, "node 1: not running\nnode 2: not running\nnode 3: not running\n")


def test_cluster_commands_are_two_words() -> None:
    assert kafka_cli("cluster").returncode == 2
    assert kafka_cli("start", "--node", "2").returncode == 2
    assert kafka_cli("cluster", "status", "--node", "4").returncode == 2


def test_cluster_kill_names_its_node(tmp_path: Path) -> None:
    everyone = kafka_cli("cluster", "kill", "--home", str(tmp_path / "cluster"))
    assert everyone.returncode == 1 and "cluster kill needs --node N" in everyone.stderr
    absent = kafka_cli("cluster", "kill", "--node", "2", "--home", str(tmp_path / "cluster"),
                       FERRY_LOCAL_KAFKA_CLUSTER_PORT=str(free_port()))
    assert (absent.returncode, absent.stderr) == (0, "not running\n")
