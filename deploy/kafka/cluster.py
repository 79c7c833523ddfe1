"""A real three-node Apache Kafka cluster (KRaft) on loopback, for the tests and benchmarks of broker loss.

Each node is a ``LocalKafka`` (broker.py) playing both KRaft roles, and the three controllers form
one quorum of three voters: the cluster keeps a controller and a leader for every partition while
any two nodes run. Every topic gets three replicas and ``min.insync.replicas=2`` (internal topics
too), so an ``acks=all`` write survives the loss of any one node. State lives under ``<home>``
(default ``.local/kafka-cluster``, beside the single broker's ``.local/kafka``):

    cluster.id     the id every node's storage is formatted with (kept: a node whose data was
                   deleted is formatted into the same cluster)
    node1/ node2/ node3/   each a LocalKafka home: data/, logs/, server.properties, broker.pid

Node n (1-3) listens for clients on ``port + 2(n-1)`` and for its controller peers on the port
after it: 29192-29197 by default, clear of the single broker (19092-19093, or the port the tests
set), of the tests' private brokers (21000-28999) and of the ephemeral range (32768 and up).

Heap: each node runs with ``-Xms256m -Xmx1g``, Kafka's own default maximum, as the single broker
does. 1 GiB holds the log cleaner's 128 MiB dedupe buffer plus several of Ferry's largest records
(26 MiB uploads) in flight to two followers at once. The box (2 cores, 24 GiB) fits it with room
to spare: three nodes at most ~3.6 GiB (heap plus ~200 MiB of JVM overhead each), two APIs and
three workers under 2 GiB, and the rest is page cache, which the brokers read records back from
(measured RSS of each in docs/benchmarks.md). Memory does not bound this box; the 2 cores do, so
the heaps are not made smaller (more collections) or larger (longer ones) than Kafka's default.

``start()`` is idempotent like the single broker's: running nodes are reused and stopped ones
started. One node can be stopped (SIGTERM: a controlled shutdown that moves its leaderships
first), killed (SIGKILL, as a crash) and started again while the other two serve:
``stop(node)``, ``kill(node)``, ``start(node)``. ``partition_state()`` says which node leads a
partition and which replicas are in sync, as the brokers' metadata says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError, for_code

from deploy.kafka.broker import DEFAULT_HOME, LocalKafka, _kafka_uuid

DEFAULT_CLUSTER_HOME = DEFAULT_HOME.with_name("kafka-cluster")
DEFAULT_CLUSTER_PORT = 29192
NODES = 3
NODE_HEAP = "1g"

T = TypeVar("T")


@dataclass
class LocalKafkaCluster:
    """Three local KRaft nodes, identified by the cluster's home directory and first port."""

    home: Path = DEFAULT_CLUSTER_HOME
    port: int = DEFAULT_CLUSTER_PORT
    heap: str = NODE_HEAP
    nodes: dict[int, LocalKafka] = field(init=False)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        ports = {node_id: self.port + 2 * (node_id - 1) for node_id in range(1, NODES + 1)}
        voters = {node_id: port + 1 for node_id, port in ports.items()}
        self.nodes = {
            node_id: LocalKafka(
                home=self.home / f"node{node_id}", port=port, controller_port=voters[node_id], heap=self.heap,
                node_id=node_id, voters=voters, replicas=NODES, min_insync_replicas=NODES - 1,
            )
            for node_id, port in ports.items()
        }

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes.values())

    @property
    def id_file(self) -> Path:
        return self.home / "cluster.id"

    def node(self, node_id: int) -> LocalKafka:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ValueError(f"no node {node_id}: the cluster's nodes are {sorted(self.nodes)}") from None

    def _cluster_id(self) -> str:
        """The id every node formats its storage with, made once and kept in the home."""
        try:
            return self.id_file.read_text().strip()
        except FileNotFoundError:
            pass
        self.home.mkdir(parents=True, exist_ok=True)
        staging = self.id_file.with_suffix(".partial")
        staging.write_text(_kafka_uuid())
        # Renamed into place whole: a start interrupted here never leaves an empty id behind.
        os.replace(staging, self.id_file)
        return self.id_file.read_text().strip()

    def _each(self, action: Callable[[LocalKafka], T], node_id: int | None) -> list[T]:
        """``action`` on one node, or on every node at once.

        At once, not in turn: a node's start waits for a controller quorum, which needs a second
        node, and a node's controlled shutdown waits on the quorum the others are leaving."""
        if node_id is not None:
            return [action(self.node(node_id))]
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            return list(pool.map(action, self.nodes.values()))

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, node: int | None = None, timeout: float = 120.0) -> str:
        """Start every node (or one) that does not run yet; return the bootstrap list once they serve.

        One node alone cannot start: it serves once a controller quorum (two of the three) runs."""
        self.node(1).ensure_jars()  # once, before the nodes start side by side
        cluster_id = self._cluster_id()
        for each in self.nodes.values():
            each.cluster_id = cluster_id
        self._each(lambda each: each.start(timeout), node)
        return self.bootstrap_servers

    def stop(self, node: int | None = None, timeout: float = 30.0) -> bool:
        """Stop every node (or one): SIGTERM, SIGKILL after ``timeout``. True if any ran."""
        return any(self._each(lambda each: each.stop(timeout), node))

    def kill(self, node: int) -> bool:
        """SIGKILL one node, as a crash would; True if it ran."""
        return self.node(node).kill()

    def active_controller(self) -> int | None:
        """The node the controller quorum follows now (the KRaft leader), as the running nodes
        last wrote it in their ``quorum-state`` file; None if none has one."""
        latest: tuple[int, int] | None = None  # (epoch, leader)
        for each in self.nodes.values():
            if each.running_pid() is None:
                continue
            try:
                state = json.loads((each.data_dir / "__cluster_metadata-0" / "quorum-state").read_text())
            except (OSError, ValueError):
                continue
            if state.get("leaderId", -1) >= 0 and (latest is None or state["leaderEpoch"] > latest[0]):
                latest = (state["leaderEpoch"], state["leaderId"])
        return latest[1] if latest else None

    def running(self) -> dict[int, int | None]:
        """Each node's pid, or None where it does not run."""
        return {node_id: each.running_pid() for node_id, each in self.nodes.items()}


# -- what the brokers say ---------------------------------------------------------------------

@dataclass(frozen=True)
class PartitionState:
    """A partition's leader (a node id; -1 while it has none), its replicas and those in sync."""

    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


async def partition_state(bootstrap_servers: str, topic: str, partition: int = 0) -> PartitionState:
    """Who leads ``topic``'s ``partition`` and which replicas are in sync, from a broker's metadata.

    Raises aiokafka's ``KafkaError`` when no broker answers or the topic is unknown."""
    states = await partition_states(bootstrap_servers, [topic])
    try:
        return states[topic, partition]
    except KeyError:
        raise UnknownTopicOrPartitionError(f"{topic} has no partition {partition}") from None


async def partition_states(bootstrap_servers: str, topics: list[str]) -> dict[tuple[str, int], PartitionState]:
    """Every partition of ``topics``, keyed by (topic, partition), as one broker's metadata says.

    A fresh client per call: a long-lived one keeps asking the node that was just killed. Raises
    aiokafka's ``KafkaError`` when no broker answers or a topic is unknown."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
        states = {}
        for described in await admin.describe_topics(topics):
            if described["error_code"]:
                raise for_code(described["error_code"])(f"topic {described['topic']}")
            for found in described["partitions"]:
                states[described["topic"], found["partition"]] = PartitionState(
                    found["leader"], tuple(found["replicas"]), tuple(found["isr"]))
        return states
    finally:
        await admin.close()
