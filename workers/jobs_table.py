"""The jobs table as a worker holds it: a Faust table placed by Ferry's partition rule, on disk.

Placement: a job's partition is ``app.topics.partition_for(job_id)``, the rule the API and the
request topics use, rather than Faust's "the partition of the event being processed". So the
runner can write an outcome from its own task, outside any stream iteration.

Storage: a worker keeps every job of its partitions until the job expires (an hour by default),
result included. In memory that grows with every job done (about 1.5 KB per 1 KB chat job, and
a speech result can be megabytes); in RocksDB it lives on disk, and the worker's memory is
bounded by the options below whatever the number of jobs. ``FERRY_WORKER_TABLE_STORE=memory``
keeps Faust's in-memory store (no local files; memory grows with the jobs held).

Changelog writes: Faust puts a table's writes in its producer buffer, and its conductor, which
hands every fetched record to every stream, stops delivering while more than 100 writes wait
there, until it has counted 100 of them sent. Under steady load (the runner writes outcomes
from its own tasks) the buffer rarely empties, so delivery stopped again and again (14-17
"producer buffer full" stalls in a 10 s run at 200 jobs/s). This table sends its writes
itself, in the order they were made, from one task of its own. How many wait is bounded by the
worker: each write belongs to an in-flight slot, a catch-up chunk, or an event not yet acked.
"""

from __future__ import annotations

import asyncio
import collections

import faust
from faust.stores.rocksdb import Store as RocksDBStore
from yarl import URL

from app.topics import partition_for

# Per partition: memtables of 2 x 1 MiB before a flush to disk, and a 2 MiB block cache for
# reads (a worker reads back mostly jobs it wrote moments ago: those are still in a memtable).
# So a worker's table costs at most about 4 MiB of memory per partition it owns.
ROCKSDB_OPTIONS = {"write_buffer_size": 1024 * 1024, "max_write_buffer_number": 2,
                   "block_cache_size": 2 * 1024 * 1024, "target_file_size_base": 16 * 1024 * 1024}


class JobStore(RocksDBStore):
    """Faust's RocksDB store, finding a key's partition database from the key itself."""

    def _partition(self, key: bytes) -> int:
        return self.table.partition_for_key(key)

    def _set(self, key: bytes, value: bytes | None) -> None:
        self._db_for_partition(self._partition(key)).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        db = self._dbs.get(self._partition(key))
        return db.get(key) if db is not None else None  # not open: not this worker's partition

    def _del(self, key: bytes) -> None:
        db = self._dbs.get(self._partition(key))
        if db is not None:
            db.delete(key)

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None


class JobsTable(faust.Table):
    """The jobs table, sending its changelog writes itself (see the module's docstring) and
    remembering the last one so that a caller can await it."""

    last_write: asyncio.Future | None = None
    _sender: asyncio.Task | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unsent: collections.deque = collections.deque()  # writes not yet handed to the producer

    def partition_for_key(self, key: bytes) -> int:
        return partition_for(key.decode(), self.partitions)

    def send_changelog(self, partition, key, value, key_serializer=None, value_serializer=None):
        """Queue a changelog write; the returned future is done when Kafka acknowledged it."""
        write = self.changelog_topic.as_future_message(
            key=key, value=value, partition=partition,
            key_serializer=self.key_serializer if key_serializer is None else key_serializer,
            value_serializer=self.value_serializer if value_serializer is None else value_serializer,
            callback=self._on_changelog_sent, eager_partitioning=True)
        self._unsent.append(write)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_unsent())
        self.last_write = write
        return write

    async def flush_writes(self, timeout: float) -> bool:
        """Wait until every write made so far is acknowledged (or failed), up to ``timeout``.

        A rebalance calls it, as Faust flushes its own producer buffer then: the partition's next
        owner recovers the table from the changelog, which must hold what this worker wrote.
        """
        sender = self._sender
        try:
            async with asyncio.timeout(timeout):
                if sender is not None and not sender.done():
                    await asyncio.shield(sender)
                await self.app.producer.flush()
        except TimeoutError:
            return False
        return True

    async def _send_unsent(self) -> None:
        """Hand the queued writes to the producer one by one: one sender keeps them in order."""
        while self._unsent:
            write = self._unsent.popleft()
            try:
                await self.changelog_topic.publish_message(write, wait=False)
            except Exception as exc:  # e.g. the producer stopped: whoever awaits the write sees it
                if not write.done():
                    write.set_exception(exc)

    def _new_store_by_url(self, url):
        if URL(str(url)).scheme != "rocksdb":
            return super()._new_store_by_url(url)
        return JobStore(url, self.app, self, table_name=self.name, key_type=self.key_type,
                        key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                        value_type=self.value_type, loop=self.loop, options={**ROCKSDB_OPTIONS, **(self.options or {})})
