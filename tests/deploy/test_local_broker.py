"""The local broker script: idempotent start, clean stop, and recovery from a crash's leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy.kafka.broker import STARTED_MARKER, LocalKafka


def _broker_processes(properties: Path) -> list[int]:
    """Pids of java processes running a broker with this properties file."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and b"kafka.Kafka" in cmdline and str(properties).encode() in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(240)
def test_start_twice_gives_one_broker_and_stop_leaves_nothing(private_broker: LocalKafka) -> None:
    first = private_broker.start()
    pid = private_broker.running_pid()
    second = private_broker.start()

    assert first == second == f"127.0.0.1:{private_broker.port}"
    assert private_broker.running_pid() == pid
    assert _broker_processes(private_broker.properties_file) == [pid]

    assert private_broker.stop() is True
    assert _broker_processes(private_broker.properties_file) == []
    assert not private_broker.pid_file.exists()
    assert private_broker.stop() is False  # stopping twice is harmless


@pytest.mark.timeout(300)
def test_a_running_broker_whose_log_rolled_over_is_found(private_broker: LocalKafka) -> None:
    """A long-running broker's log rolls over at 100 MB, one old file kept: after two rolls its
    start marker is gone, and every later start() (each test session's, each bench run's) waited
    90 s and failed with "the broker did not start"."""
    address = private_broker.start()
    pid = private_broker.running_pid()
    log = private_broker.log_dir / "server.log"
    log.replace(private_broker.log_dir / "server.log.1")
    log.write_text("")  # as log4j leaves it: a new file, the marker in none
    again = LocalKafka(home=private_broker.home, port=private_broker.port, heap="512m")
    assert again.start(timeout=20) == address
    assert again.running_pid() == pid


@pytest.mark.timeout(240)
def test_a_broker_is_found_through_a_symlinked_home(private_broker: LocalKafka, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A second checkout whose ``.local`` links to the first's: the broker's command line names the
    first path, running_pid() compared the two as text, found no broker and deleted the running
    one's pid file, and every later start() failed with "port taken by a process this broker home
    did not start". The second home is given relative, as a checkout's own path would be."""
    address = private_broker.start()
    pid = private_broker.running_pid()
    (tmp_path / "second-checkout").mkdir()
    (tmp_path / "second-checkout" / "local-kafka").symlink_to(private_broker.home)
    monkeypatch.chdir(tmp_path / "second-checkout")
    through_link = LocalKafka(home=Path("local-kafka"), port=private_broker.port, heap="512m")

    assert through_link.running_pid() == pid
    assert through_link.start(timeout=20) == address
    assert private_broker.running_pid() == pid  # its pid file survived


@pytest.mark.timeout(240)
def test_start_after_a_crash(private_broker: LocalKafka) -> None:
    private_broker.start()
    crashed_pid = private_broker.running_pid()
    assert private_broker.kill() is True
    assert private_broker.pid_file.exists()  # the crash left its pid file behind

    private_broker.start()
    new_pid = private_broker.running_pid()
    assert new_pid is not None and new_pid != crashed_pid
    assert _broker_processes(private_broker.properties_file) == [new_pid]
    os.kill(new_pid, 0)


def test_cluster_ids_never_look_like_options() -> None:
    from deploy.kafka.broker import _kafka_uuid

    ids = [_kafka_uuid() for _ in range(2000)]  # about 31 of 2000 would start with "-" unchecked
    assert all(not cluster_id.startswith("-") and len(cluster_id) == 22 for cluster_id in ids)


def test_a_start_is_seen_in_a_log_that_rolled_over_since(tmp_path: Path) -> None:
    # The broker's log rolls at its size cap; a start that rolled it writes its marker at the top
    # of a new file, shorter than the old one was when the start began.
    broker = LocalKafka(home=tmp_path)
    broker.log_dir.mkdir(parents=True)
    log = broker.log_dir / "server.log"
    log.write_text(f"[2026-12-03 16:40:00,000] INFO [KafkaRaftServer nodeId=1] {STARTED_MARKER} (kafka.Kafka)\n")
    assert broker._started_since(offset=100 * 1024 * 1024)
    # Without a rollover, only what the start appended counts: an earlier start's marker does not.
    before = log.stat().st_size
    with log.open("a") as more:
        more.write("[2026-12-03 16:41:00,000] INFO starting (kafka.Kafka)\n")
    assert not broker._started_since(offset=before)
