"""aiokafka's fetcher, watched: a consumer whose background fetch task has died says so.

aiokafka fetches in one background task per consumer. An exception it does not expect (a bug,
in aiokafka or in Ferry's fetch sessions; a malformed answer) ends that task; aiokafka logs it
once, and from then on every ``getmany`` waits out its timeout and returns nothing, as if no
record had come. The worker then takes no more requests and the API's view of the jobs no longer
moves, both still answering their readiness probes. ``WatchedFetcher`` raises ``FetchTaskDied``
from the waiting ``getmany`` and every later one instead, so its owner can act: the worker exits
(to be restarted; what it had not acknowledged is taken again), the API's read model and the
worker's request fetcher replace the consumer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.errors import KafkaError


class FetchTaskDied(KafkaError):  # type: ignore[misc]  # aiokafka has no type hints
    """The consumer's background fetch task has ended while the consumer runs: it fetches nothing more."""


class WatchedFetcher(Fetcher):  # type: ignore[misc]  # aiokafka has no type hints
    """aiokafka's fetcher, raising ``FetchTaskDied`` once its background fetch task has died."""

    def __init__(self, client: Any, subscriptions: Any, **options: Any) -> None:
        super().__init__(client, subscriptions, **options)
        self._fetch_task.add_done_callback(self._wake_waiters_if_died)

    def died(self) -> FetchTaskDied | None:
        """Why fetching has stopped while the consumer runs, or None while it goes on."""
        task = self._fetch_task
        if self._closed or not task.done():
            return None
        failure = None if task.cancelled() else task.exception()
        # aiokafka wraps the exception in "Unexpected error during data retrieval": name the cause.
        cause = failure.__cause__ if failure is not None and failure.__cause__ is not None else failure
        return FetchTaskDied(f"the Kafka fetch task has died ({cause!r})" if cause else
                             "the Kafka fetch task has ended")

    def _wake_waiters_if_died(self, task: Any) -> None:
        died = self.died()
        if died is not None:
            for waiter in list(self._fetch_waiters):
                if not waiter.done():
                    waiter.set_exception(died)

    async def fetched_records(self, partitions: Any, timeout: float = 0, max_records: int | None = None) -> Any:
        died = self.died()
        if died is not None:
            raise died
        return await super().fetched_records(partitions, timeout, max_records=max_records)

    async def close(self) -> None:
        if self.died() is not None:
            # Raised already. aiokafka's close() would raise it again, from the consumer's stop(),
            # by awaiting the dead task and then the fetch that failed in it, and stop short.
            self._fetch_task = asyncio.get_running_loop().create_future()
            self._fetch_task.set_result(None)
            for task in [task for task in self._pending_tasks if task.done()]:
                self._pending_tasks.discard(task)
                if not task.cancelled():
                    task.exception()  # retrieved: asyncio would log it once more when collected
        await super().close()


def fetch_task_died(consumer: AIOKafkaConsumer) -> FetchTaskDied | None:
    """Whether ``consumer``'s (watched) fetcher has died, and why."""
    fetcher = consumer._fetcher
    return fetcher.died() if isinstance(fetcher, WatchedFetcher) else None


async def replace_fetcher(consumer: AIOKafkaConsumer, fetcher_class: type[WatchedFetcher] = WatchedFetcher) -> None:
    """Give a started consumer a ``fetcher_class`` in place of the fetcher ``start()`` made, with the
    same settings. Records the old one held and nobody took are fetched again: a partition's
    position moves only when its records are taken."""
    plain = consumer._fetcher
    consumer._fetcher = fetcher_class(
        consumer._client, consumer._subscription,
        key_deserializer=consumer._key_deserializer, value_deserializer=consumer._value_deserializer,
        fetch_min_bytes=consumer._fetch_min_bytes, fetch_max_bytes=consumer._fetch_max_bytes,
        fetch_max_wait_ms=consumer._fetch_max_wait_ms, max_partition_fetch_bytes=consumer._max_partition_fetch_bytes,
        check_crcs=consumer._check_crcs, fetcher_timeout=consumer._consumer_timeout,
        retry_backoff_ms=consumer._retry_backoff_ms, auto_offset_reset=consumer._auto_offset_reset,
        isolation_level=consumer._isolation_level, client_rack=consumer._client_rack,
    )
    await plain.close()
