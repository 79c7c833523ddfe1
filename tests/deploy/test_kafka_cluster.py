"""The local three-node cluster: an acks=all write survives the crash of its partition's leader, and
the crashed node, started again, catches up and rejoins the in-sync replicas."""

from __future__ import annotations

import subprocess
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from deploy.kafka.cluster import LocalKafkaCluster, PartitionState, partition_state
from deploy.processes import REPO_ROOT
from tests.helpers import wait_until

RECORDS = 50  # per phase: before the crash, and after it
# The cluster fences a silent node after broker.session.timeout.ms (3 s) and elects a new leader;
# the bound leaves room for a controller election too and for a box busy with other work.
FAILOVER_WITHIN = 60


async def _state(bootstrap: str, topic: str) -> PartitionState | None:
    try:
        return await partition_state(bootstrap, topic)
    except KafkaError:
        return None  # the broker asked was the one just killed, or is still starting


async def _send(producer: AIOKafkaProducer, topic: str, start: int) -> list[int]:
    futures = [await producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
               for i in range(start, start + RECORDS)]
    return [(await future).offset for future in futures]


async def test_a_crashed_leader_loses_no_acked_write_and_rejoins(kafka_cluster: LocalKafkaCluster,
                                                                  unique_id: str) -> None:
    bootstrap = kafka_cluster.bootstrap_servers
    topic = f"cluster-{unique_id}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=3,
                                            topic_configs={"min.insync.replicas": "2"})])
    finally:
        await admin.close()
    everyone = tuple(sorted(kafka_cluster.nodes))

    async def all_in_sync() -> PartitionState | None:
        state = await _state(bootstrap, topic)
        return state if state and state.leader in everyone and sorted(state.isr) == list(everyone) else None

    before = await wait_until(all_in_sync, FAILOVER_WITHIN, "three replicas in sync")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        assert await _send(producer, topic, 0) == list(range(RECORDS))

        crashed = before.leader
        assert kafka_cluster.kill(crashed)
        try:
            async def new_leader() -> PartitionState | None:
                state = await _state(bootstrap, topic)
                return state if state and state.leader not in (-1, crashed) else None

            during = await wait_until(new_leader, FAILOVER_WITHIN, f"a leader other than node {crashed}")
            assert crashed not in during.isr
            # Two replicas are in sync, min.insync.replicas: acks=all is still answered.
            assert await _send(producer, topic, RECORDS) == list(range(RECORDS, 2 * RECORDS))
        finally:
            kafka_cluster.start(crashed)
    finally:
        await producer.stop()

    after = await wait_until(all_in_sync, FAILOVER_WITHIN, f"node {crashed} back in sync")
    assert sorted(after.replicas) == list(everyone)

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        received: list[tuple[bytes | None, bytes | None]] = []
        while len(received) < 2 * RECORDS:
            batch = await consumer.getmany(timeout_ms=30_000)
            assert batch, f"no records within 30 s; {len(received)} read"
            received += [(record.key, record.value) for records in batch.values() for record in records]
    finally:
        await consumer.stop()
    assert received == [(f"k{i}".encode(), f"v{i}".encode()) for i in range(2 * RECORDS)]


def test_the_command_line_kills_one_node_as_a_crash(kafka_cluster: LocalKafkaCluster) -> None:
    before = kafka_cluster.running()
    killed = subprocess.run([sys.executable, "-m", "deploy.kafka", "cluster", "kill", "--node", "3",
                             "--home", str(kafka_cluster.home), "--port", str(kafka_cluster.port)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    try:
        assert (killed.returncode, killed.stderr) == (0, "killed\n")
        after = kafka_cluster.running()
        assert after[3] is None and before[3] is not None
        assert after[1] == before[1] and after[2] == before[2]  # the others untouched
    finally:
        kafka_cluster.start(3)
