"""A broker of the three-node cluster lost under load: a leader or a follower SIGKILLed, or every
node restarted in turn with SIGTERM. Every accepted job completes, once; a 503 always means the
job does not run; nothing answers 500; the API and the worker need no restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster_faults import BrokerFault, broker_fault
from deploy.kafka.cluster import LocalKafkaCluster
from tests.helpers import report

# At least 2,000 jobs through each fault (80 a second for 26 s), small enough for CI.
RATE = 80
SECONDS = 26


def assert_nothing_lost_or_run_when_refused(figures: dict) -> None:
    assert figures["unexpected"] == [], f"answers other than 202 and 503: {figures['statuses']}"
    assert figures["submitted"] >= 2000
    assert figures["lost"] == [], f"{len(figures['lost'])} accepted jobs never ended"
    assert figures["completed"] == figures["accepted"]
    assert figures["refused_but_called"] == [], "a job answered 503 was run"
    # A 503 that names its job means "may run": the submit path waits for Kafka's verdict
    # instead, so a broker's loss never leaves a client unsure.
    assert figures["uncertain_503"] == 0
    assert figures["duplicate_calls"] == 0
    assert figures["alive"] == {"api": True, "worker": True}


@pytest.mark.timeout(600)
async def test_a_follower_lost_under_load_refuses_no_submit(kafka_cluster: LocalKafkaCluster, tmp_path: Path) -> None:
    figures = await broker_fault(kafka_cluster, BrokerFault("follower", RATE, SECONDS), tmp_path)
    report("cluster_follower_killed", **{k: v for k, v in figures.items() if k not in ("lost", "refused_but_called")})
    assert_nothing_lost_or_run_when_refused(figures)
    assert figures["statuses"] == {"202": figures["submitted"]}, "a follower's loss costs no submit"


@pytest.mark.timeout(600)
async def test_a_leader_lost_under_load_loses_nothing(kafka_cluster: LocalKafkaCluster, tmp_path: Path) -> None:
    figures = await broker_fault(kafka_cluster, BrokerFault("leader", RATE, SECONDS), tmp_path)
    report("cluster_leader_killed", **{k: v for k, v in figures.items() if k not in ("lost", "refused_but_called")})
    assert_nothing_lost_or_run_when_refused(figures)


@pytest.mark.timeout(900)
async def test_a_rolling_restart_under_load_refuses_no_submit(kafka_cluster: LocalKafkaCluster,
                                                              tmp_path: Path) -> None:
    figures = await broker_fault(kafka_cluster, BrokerFault("rolling", RATE, SECONDS), tmp_path)
    report("cluster_rolling_restart", **{k: v for k, v in figures.items() if k not in ("lost", "refused_but_called")})
    assert_nothing_lost_or_run_when_refused(figures)
    assert figures["statuses"] == {"202": figures["submitted"]}, "a controlled restart costs no submit"
