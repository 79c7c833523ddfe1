"""A second worker on the same machine, started without its own data dir or web port, exits at
once saying what to set, and the first one keeps running."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import pytest

from app.settings import Settings
from deploy.processes import FerryProcess
from tests.helpers import wait_until


async def worker_ready(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health/ready") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def first_worker(settings: Settings, tmp_path: Path) -> FerryProcess:
    worker = FerryProcess("workers", settings, tmp_path / "first").start()
    try:
        await wait_until(lambda: worker_ready(worker.web_port), 120, "the first worker to be ready", interval=0.2)
        yield worker
    finally:
        try:
            worker.terminate(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()


def run_second(settings: Settings, workdir: Path, **env: str) -> tuple[int, str]:
    second = FerryProcess("workers", settings, workdir, **env).start()
    try:
        code = second.process.wait(timeout=120)  # a guard: it exits long before
    finally:
        second.kill()
    return code, (workdir / "workers.log").read_text()


@pytest.mark.timeout(300)
async def test_a_second_worker_in_the_same_data_dir_exits_at_once(first_worker: FerryProcess, settings: Settings,
                                                                  tmp_path: Path) -> None:
    data_dir = first_worker.env["FERRY_WORKER_DATA_DIR"]
    code, output = run_second(settings, tmp_path / "second", FERRY_WORKER_DATA_DIR=data_dir)

    assert code != 0
    assert output.strip().splitlines()[-1] == (
        f"another worker uses {data_dir} (locked by pid {first_worker.pid}): "
        "give this worker its own FERRY_WORKER_DATA_DIR and FERRY_WORKER_WEB_PORT")
    assert first_worker.process.poll() is None
    assert await worker_ready(first_worker.web_port)


@pytest.mark.timeout(300)
async def test_a_second_worker_on_the_same_web_port_exits_at_once(first_worker: FerryProcess, settings: Settings,
                                                                  tmp_path: Path) -> None:
    port = first_worker.web_port
    code, output = run_second(settings, tmp_path / "second", FERRY_WORKER_WEB_PORT=str(port))

    assert code != 0
    assert output.strip().splitlines()[-1] == (
        f"port {port} ({settings.worker_web_host}) is taken, perhaps by another worker: "
        "give this worker its own FERRY_WORKER_DATA_DIR and FERRY_WORKER_WEB_PORT")
    assert first_worker.process.poll() is None
    assert await worker_ready(first_worker.web_port)


@pytest.mark.timeout(300)
async def test_a_worker_takes_the_data_dir_of_one_that_was_killed(settings: Settings, tmp_path: Path) -> None:
    crashed = FerryProcess("workers", settings, tmp_path / "crashed").start()
    await wait_until(lambda: worker_ready(crashed.web_port), 120, "the worker to be ready", interval=0.2)
    crashed.kill()  # SIGKILL: the kernel releases the lock; the lock file (and its pid) stays behind

    again = FerryProcess("workers", settings, tmp_path / "again",
                         FERRY_WORKER_DATA_DIR=crashed.env["FERRY_WORKER_DATA_DIR"]).start()
    try:
        await wait_until(lambda: worker_ready(again.web_port), 120, "the replacement to be ready", interval=0.2)
    finally:
        again.kill()
