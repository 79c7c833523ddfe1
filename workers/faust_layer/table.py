"""The jobs table: a Faust table placed by Ferry's partition rule, in RocksDB, writing its changelog itself.

Placement: a job's partition is ``app.topics.partition_for(job_id)``, the rule the API and the
request topics use, not Faust's "the partition of the event being processed"; so any task
(the runner, the maintenance timer) can write a job.

Changelog writes skip Faust's producer buffer, whose fullness (over 100 writes) stops every
stream until it ebbs; here one task hands the writes to the producer in the order they were
made, and each write's future says when Kafka acknowledged it.
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
ROCKSDB_OPTIONS = {"write_buffer_size": 1024 * 1024, "max_write_buffer_number": 2,
                   "block_cache_size": 2 * 1024 * 1024, "target_file_size_base": 16 * 1024 * 1024}


class JobStore(RocksDBStore):
    """Faust's RocksDB store, finding a key's partition database from the key itself."""

    def _partition(self, key: bytes) -> int:
        return partition_for(key.decode(), self.table.partitions or 1)

    def _set(self, key: bytes, value: bytes | None) -> None:
        self._db_for_partition(self._partition(key)).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        db = self._dbs.get(self._partition(key))
        return db.get(key) if db is not None else None  # not open: not this worker's partition

    def _del(self, key: bytes) -> None:
        if (db := self._dbs.get(self._partition(key))) is not None:
            db.delete(key)

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None


class JobsTable(faust.Table):
    """The jobs table; ``write`` stores a value (None: deletes it) and returns its changelog write."""

    _sender: asyncio.Task | None = None

    def __init__(self, app, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._unsent: collections.deque = collections.deque()  # writes not yet handed to the producer

    async def on_changelog_event(self, event) -> None:
        """Once recovery has ended, Faust keeps the changelog records it reads in a buffer, applied at
        the next rebalance: over the values written since, whose offsets recovery then starts after.
        Records read once recovery has ended are applied now."""
        await super().on_changelog_event(event)
        if not (recovery := self.app.tables.recovery).in_recovery:  # type: ignore[attr-defined]
            recovery.flush_buffers()

    def partition_for_key(self, key: bytes) -> int:
        return partition_for(key.decode(), self.partitions)

    def write(self, key: bytes, value: bytes | None) -> asyncio.Future:
        """Store ``value`` under ``key`` (or delete it); the future is done when Kafka has it."""
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value
        return self.send_changelog(self.partition_for_key(key), key, value)

    def send_changelog(self, partition, key, value, key_serializer=None, value_serializer=None):
        """Queue a changelog write (Faust's tables call it too); the future is done when acknowledged."""
        write = self.changelog_topic.as_future_message(
            key=key, value=value, partition=partition, key_serializer=key_serializer or self.key_serializer,
            value_serializer=value_serializer or self.value_serializer,
            callback=self._on_changelog_sent, eager_partitioning=True)
        self._unsent.append(write)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_unsent())
        return write

    async def flush_writes(self, timeout: float) -> bool:
        """Wait until every write made so far is acknowledged (or failed), up to ``timeout``: a
        rebalance's next owner recovers the table from the changelog, which must hold them."""
        try:
            async with asyncio.timeout(timeout):
                if self._sender is not None and not self._sender.done():
                    await asyncio.shield(self._sender)
                await self.app.producer.flush()
        except TimeoutError:
            return False
        return True

    async def _send_unsent(self) -> None:
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
