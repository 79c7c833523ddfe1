"""When each job of a worker's partitions expires, held compactly so memory stays flat.

The maintenance timer needs the jobs whose ``expires_at`` has passed without scanning the table.
A heap of ``(datetime, id)`` per job costs several times what is needed (figures in
``docs/benchmarks.md``); here jobs are grouped by the second they expire in, each group one
bytearray of ids, and the heap holds seconds, not jobs.
"""

from __future__ import annotations

import heapq
import math
from datetime import datetime


class ExpiryIndex:
    def __init__(self) -> None:
        self._seconds: list[int] = []  # heap of the seconds that have a group
        self._groups: dict[int, bytearray] = {}  # second -> ids, each followed by b"\n"

    def __len__(self) -> int:
        return sum(group.count(b"\n") for group in self._groups.values())

    def add(self, expires_at: datetime, job_id: str) -> None:
        second = math.ceil(expires_at.timestamp())  # never reported before its time
        group = self._groups.get(second)
        if group is None:
            group = self._groups[second] = bytearray()
            heapq.heappush(self._seconds, second)
        group += job_id.encode() + b"\n"

    def pop_due(self, now: datetime) -> list[str]:
        """The ids whose expiry is at or before ``now``, each once (removed from the index)."""
        due: list[str] = []
        while self._seconds and self._seconds[0] <= now.timestamp():
            group = self._groups.pop(heapq.heappop(self._seconds))
            due.extend(group.decode().split("\n")[:-1])
        return due

    def clear(self) -> None:
        self._seconds.clear()
        self._groups.clear()
