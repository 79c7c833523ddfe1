"""Command line for the local Kafka broker: ``python -m deploy.kafka start|stop|status|fetch``."""

from __future__ import annotations

import argparse
import sys
import time

from app.settings import Settings
from deploy.kafka.broker import DEFAULT_HOME, BrokerError, LocalKafka


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


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m deploy.kafka", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status", "fetch"])
    parser.add_argument("--port", type=int, default=settings.local_kafka_port)
    parser.add_argument("--home", default=str(DEFAULT_HOME))
    args = parser.parse_args(argv)
    broker = LocalKafka(home=args.home, port=args.port)
    try:
        if args.command == "fetch":
            broker.ensure_jars()
        elif args.command == "start":
            began = time.monotonic()
            was_running = broker.running_pid() is not None
            print(broker.start())
            note = "already running" if was_running else f"started in {time.monotonic() - began:.1f} s"
            print(f"local Kafka on {broker.bootstrap_servers}: {note}", file=sys.stderr)
        elif args.command == "stop":
            stopped = broker.stop()
            print("stopped" if stopped else "not running", file=sys.stderr)
        elif args.command == "status":
            # A status query answers; a broker that is not running is an answer, not a failure.
            print(_status(broker))
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
