"""Kills a consumer's background fetch task from inside, as an exception aiokafka does not expect
would: the fault behind a worker or an API that stops reading Kafka yet answers ready.

In this process: ``FetchFaults.install(monkeypatch)``, then ``arm(client_id)``: the next fetch that
client's consumer makes raises ``InjectedFetchFault``, which ends its fetch task. In a worker
process: ``python -m tests.chaos.fetch_faults TRIGGER_FILE`` runs ``python -m workers`` whose
fetches all fail once ``TRIGGER_FILE`` exists.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka.consumer.fetcher import Fetcher

_plain_fetch = Fetcher._proc_fetch_request


class InjectedFetchFault(RuntimeError):
    """Raised in place of a fetch, inside aiokafka's fetch task."""


class FetchFaults:
    """Which clients' next fetch fails, and how many fetches have failed so far, per client."""

    def __init__(self) -> None:
        self.armed: set[str] = set()
        self.fired: Counter[str] = Counter()

    def install(self, monkeypatch: Any) -> FetchFaults:
        faults = self

        async def fetch(fetcher: Fetcher, assignment: Any, node_id: int, request: Any) -> bool:
            client_id = fetcher._client._client_id
            if client_id in faults.armed:
                faults.armed.discard(client_id)
                faults.fired[client_id] += 1
                raise InjectedFetchFault(f"injected into {client_id}'s fetch task")
            return await _plain_fetch(fetcher, assignment, node_id, request)

        monkeypatch.setattr(Fetcher, "_proc_fetch_request", fetch)
        return self

    def arm(self, client_id: str) -> None:
        self.armed.add(client_id)


def _fail_fetches_once_triggered(trigger: Path) -> None:
    async def fetch(fetcher: Fetcher, assignment: Any, node_id: int, request: Any) -> bool:
        if trigger.exists():
            raise InjectedFetchFault("injected into the worker's fetch task")
        return await _plain_fetch(fetcher, assignment, node_id, request)

    Fetcher._proc_fetch_request = fetch  # type: ignore[method-assign]


if __name__ == "__main__":
    _fail_fetches_once_triggered(Path(sys.argv.pop(1)))
    from workers.__main__ import main

    main()
