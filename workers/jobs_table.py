"""The jobs table as a worker holds it: a Faust table placed by Ferry's partition rule, on disk.

Placement: a job's partition is ``app.topics.partition_for(job_id)``, the rule the API and the
request topics use, rather than Faust's "the partition of the event being processed". So the
runner can write an outcome from its own task, outside any stream iteration.

Storage: a worker keeps every job of its partitions until the job expires (an hour by default),
result included. In memory that grows with every job done (about 1.5 KB per 1 KB chat job, and
a speech result can be megabytes); in RocksDB it lives on disk, and the worker's memory is
bounded by the options below whatever the number of jobs. ``FERRY_WORKER_TABLE_STORE=memory``
keeps Faust's in-memory store (no local files; memory grows with the jobs held).
"""

from __future__ import annotations

import asyncio

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
    """The jobs table, remembering its last changelog write so that a caller can await it."""

    last_write: asyncio.Future | None = None

    def partition_for_key(self, key: bytes) -> int:
        return partition_for(key.decode(), self.partitions)

    def send_changelog(self, *args, **kwargs):
        self.last_write = super().send_changelog(*args, **kwargs)
        return self.last_write

    def _new_store_by_url(self, url):
        if URL(str(url)).scheme != "rocksdb":
            return super()._new_store_by_url(url)
        return JobStore(url, self.app, self, table_name=self.name, key_type=self.key_type,
                        key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                        value_type=self.value_type, loop=self.loop, options={**ROCKSDB_OPTIONS, **(self.options or {})})
