"""Command line for the local Kafka broker and the local three-node cluster.

``python -m deploy.kafka start|stop|status|fetch`` runs the single broker;
``python -m deploy.kafka cluster start|stop|status [--node N]`` the cluster (all nodes, or node N);
``python -m deploy.kafka cluster kill --node N`` SIGKILLs node N, as a crash would (to try a
failover by hand: ``cluster start --node N`` brings it back).
"""

from __future__ import annotations

import argparse
import sys
import time

from app.settings import Settings
from deploy.kafka.broker import DEFAULT_HOME, BrokerError, LocalKafka
from deploy.kafka.cluster import DEFAULT_CLUSTER_HOME, NODES, LocalKafkaCluster


def _status(broker: LocalKafka) -> str:
    pid = broker.running_pid()
    if pid is None:
        return "not running"
    serving = broker.running_port()
    if serving != broker.port:
        # The home's broker is identified by its directory; another port is another broker.
        return (f"not running on {broker.bootstrap_servers} (the broker of {broker.home}, pid {pid}, "
                f"serves port {serving})")
    return f"running, pid {pid}, {broker.bootstrap_servers}"


def _broker(command: str, broker: LocalKafka) -> None:
    if command == "fetch":
        broker.ensure_jars()
    elif command == "start":
        began = time.monotonic()
        was_running = broker.running_pid() is not None
        print(broker.start())
        note = "already running" if was_running else f"started in {time.monotonic() - began:.1f} s"
        print(f"local Kafka on {broker.bootstrap_servers}: {note}", file=sys.stderr)
    elif command == "stop":
        stopped = broker.stop()
        print("stopped" if stopped else "not running", file=sys.stderr)
    elif command == "status":
        # A status query answers; a broker that is not running is an answer, not a failure.
        print(_status(broker))


def _cluster(action: str, cluster: LocalKafkaCluster, node: int | None) -> None:
    nodes = [node] if node is not None else sorted(cluster.nodes)
    if action == "start":
        began = time.monotonic()
        was_running = all(cluster.node(each).running_pid() is not None for each in nodes)
        print(cluster.start(node))
        note = "already running" if was_running else f"started in {time.monotonic() - began:.1f} s"
        print(f"local Kafka cluster, node(s) {', '.join(map(str, nodes))}: {note}", file=sys.stderr)
    elif action == "stop":
        stopped = cluster.stop(node)
        print("stopped" if stopped else "not running", file=sys.stderr)
    elif action == "kill":
        if node is None:
            raise BrokerError("cluster kill needs --node N: killing every node is cluster stop's job")
        print("killed" if cluster.kill(node) else "not running", file=sys.stderr)
    elif action == "status":
        for each in nodes:
            print(f"node {each}: {_status(cluster.node(each))}")


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m deploy.kafka", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "fetch", "cluster"])
    parser.add_argument("action", nargs="?", choices=["start", "stop", "status", "kill"], help="with cluster")
    parser.add_argument("--port", type=int, default=None,
                        help="the broker's port, or the cluster's first port (default: from the settings)")
    parser.add_argument("--home", default=None)
    parser.add_argument("--node", type=int, choices=range(1, NODES + 1), default=None,
                        help="with cluster: only this node")
    args = parser.parse_args(argv)
    if args.command == "cluster" and args.action is None:
        parser.error("cluster needs start, stop, status or kill after it")
    if args.command != "cluster" and args.action is not None:
        parser.error(f"{args.command} takes no second word (only cluster does)")
    if args.node is not None and args.command != "cluster":
        parser.error("--node goes with cluster")
    try:
        if args.command == "cluster":
            port = settings.local_kafka_cluster_port if args.port is None else args.port
            _cluster(args.action, LocalKafkaCluster(home=args.home or DEFAULT_CLUSTER_HOME, port=port), args.node)
        else:
            port = settings.local_kafka_port if args.port is None else args.port
            _broker(args.command, LocalKafka(home=args.home or DEFAULT_HOME, port=port))
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
