"""Everything Ferry changes in Faust (faust-streaming 0.15.3), in one place, each defect with its test.

The worker uses Faust through this package alone: its app factory (``app.py``), its consumer
(``consumer.py``), its jobs table (``table.py``) and its table recovery (``recovery.py``).
Each override fixes a defect where it arises; the worker itself works around none.

Each defect, as seen in faust-streaming 0.15.3 (upstream issue), its fix, and the test that
reproduces it against a real broker and fails without the fix:

1. ``Consumer.getmany`` drops records it fetched (flow stopped by a rebalance, a stale
   generation, a partition not active as recovery ends) and relies on a seek to the committed
   offset, a no-op for a partition with no commit: its first records were never delivered
   (#216, #221 / PR #223). Fix: ``FerryConsumer.getmany`` seeks each partition back to its first
   undelivered record; ``perform_seek`` sends an uncommitted stream partition to its log start.
   Tests: ``tests/workers/test_faust_layer.py::test_records_fetched_while_recovery_ends_are_all_delivered``
   and ``::test_records_getmany_discards_are_fetched_again``.
2. A record whose hand-over waits across a rebalance (the delivery, or the commit made before
   it, while a broker is away) reaches its stream with the old generation and is skipped, yet
   the consumer's read offset moves to it: the records before it, cleared from the stream's
   buffer and fetched again from the committed offset, are dropped as read already (#221).
   Fix: ``FerryConsumer._drain_messages`` delivers a record only in the generation it was
   fetched in, and moves the read offset only if it still is. Test:
   ``::test_a_hand_over_across_a_rebalance_drops_nothing``.
3. At the end of a table's recovery Faust resumes and seeks the stream partitions, then resumes
   the app's flow control, which empties every stream's buffer (mode clears its queues on
   resume): records handed over in between are dropped, and the consumer has moved past them.
   Seen as the first job events of a fresh partition never applied. Fix: no stream record is
   handed over until the rebalance has ended (``FerryConsumer._open``); those fetched earlier are
   fetched again. Test: ``::test_records_handed_over_before_the_flow_resumes_are_kept``.
4. With no partition active (recovery reading nothing, all paused), the fetcher sleeps a whole
   second and does not wake when partitions are resumed: the stream partitions resumed as
   recovery ends waited out that second before their first fetch, at every rebalance. Fix:
   ``FerryConsumer._wait_next_records`` waits for a resume instead. Test:
   ``::test_an_idle_fetcher_wakes_when_a_partition_is_resumed``.
5. A commit passes an unacked head record: ``_new_offset``'s check is off by one, and skipped
   when nothing was committed yet (#606). Fix: ``FerryConsumer._new_offset`` commits only from
   the head of the acked run. Test: ``::test_a_commit_stops_at_the_first_unacked_record``.
6. Over 100 table writes waiting in the producer buffer stop every stream until it ebbs, and
   ``flush()`` gives up after 0.1 s with writes unsent (#173). Fix: ``JobsTable`` sends its
   changelog writes itself, in order; ``write`` returns the write's future. Test:
   ``::test_streams_keep_flowing_while_table_writes_wait``.
7. Every record is handed over through ``wait_first`` (four tasks per record): on a busy loop
   the hand-over, not the work, was the limit. Fix: ``FerryConsumer._deliver`` awaits the
   delivery directly when it cannot block. Test: ``tests/workers/test_transport.py``.
8. Faust's web views serve any table key (``/table/<name>/<key>/``) and every worker's address;
   Faust reads ~80 environment variables that override the app's settings. Fix: ``PagesOnlyWeb``
   and ``create_app(env={})``. Test: ``tests/workers/test_worker_web.py``.
9. A table's own ``store=`` URL is ignored (a yarl URL without a host is falsy). Fix: the store
   is set on the app. Test: ``tests/workers/test_jobs_table.py``.
10. The livelock detector (``verify_event_path``, every ``broker_commit_interval`` x 2.5) reads
   each assigned partition's position, which aiokafka asserts is set: for a partition just
   assigned and still awaiting its offset reset, the assertion failed and the worker crashed
   (seen once in ~50 chaos runs, 3 s after a rebalance). Fix: ``FerryConsumer.verify_event_path``
   checks only positioned partitions. Test: ``::test_the_stall_check_skips_a_partition_not_yet_positioned``.
11. Changelog records recovery reads but has not applied are overwritten by time or lost. Once
   recovery has ended, Faust keeps the records it still reads (an active partition's records past
   the highwater it measured, written meanwhile by the API; a standby's) in a buffer applied at the
   next rebalance: over the values the owner wrote since, whose acknowledged offsets (the persisted
   offset) the next recovery starts after, so a job finished before the rebalance was ``pending``
   again after it and called again. And ``flow_control.resume()``, which recovery calls up to three
   times, empties the changelog queue: records handed over are lost, the consumer past them (a
   standby can keep a job ``processing`` that the changelog has finished: resumed as an orphan).
   Fix: ``JobsTable`` applies each record read once recovery has ended at once, and
   ``FerryTableManager``'s changelog queue (``recovery.py``) is not emptied on resume. Test:
   ``tests/workers/test_faust_layer.py::test_records_recovery_read_are_in_the_table``.
12. Recovery's check that a store is not ahead of its changelog (a topic emptied under a kept
   store) compared a standby's *live* read offset with a highwater measured later, and took a
   single highwater answer as final: once the standby had read a record past the answer Kafka gave
   (on the cluster, after leadership moved: a leader elected moments before answers with its
   lagging highwater until its followers' next fetch), or an active store had persisted its own
   acknowledged writes past it, the worker crashed with ``ConsistencyError`` (Faust #158; seen in
   the cluster chaos test 2b, after the broker-loss tests). Fix: ``FerryRecovery`` (``recovery.py``,
   installed by ``create_app`` with Faust's own check off) compares where this round's reading
   began, and a store found ahead has its highwater asked again (every 0.25 s, up to 5 s), the
   fresh answer replacing the lagging one recovery reads up to; it raises only if still ahead.
   Tests: ``::test_a_standby_read_past_a_lagging_highwater_is_no_crash`` (the records the changelog
   queue held at the rebalance, read during the active recovery, and the broker's earlier answer
   replayed as the lagging one), ``::test_an_active_store_past_a_lagging_highwater_is_no_crash``
   (a store's own writes past that answer, given once) and
   ``::test_a_store_ahead_of_its_changelog_still_crashes`` (given at every lookup); the cluster
   chaos test ``tests/chaos/test_cluster_scale_out.py::test_workers_join_leave_and_crash_under_steady_load``
   caught it first (1 of 2 full-suite runs).
13. At every assignment Faust seeks the partitions to their committed offsets through aiokafka's
   ``seek_to_committed``, which asks the group coordinator for one partition at a time: a worker
   holds about a hundred partitions, so on a three-broker cluster 0.5-2 s of each rebalance went
   on those round trips before a moved partition's first call. Fix:
   ``FerryConsumer.seek_to_committed`` asks for all of them in one request. Test:
   ``::test_the_seek_to_committed_asks_once``.
14. Faust asks the broker to hold each idle fetch 1.5 s, and a broker answers a connection's
   requests in order: every offset lookup (three in each table recovery) waited behind one, 1.5 s
   apiece on the cluster, most of a moved partition's stall. Fix: ``FerryConsumerThread`` holds
   fetches ``FETCH_MAX_WAIT_MS`` (100 ms; an idle worker spends ~12 ms more CPU a second). Test:
   ``::test_an_offset_lookup_waits_behind_no_long_fetch``.
15. Faust's aiokafka consumer sends every fetch as a full one, naming each of the ~100 partitions a
   worker reads however few have records (aiokafka has no KIP-227 fetch sessions). Fix:
   ``FerryConsumerThread.on_start`` gives it a fetcher with sessions (``app/fetch_sessions.py``,
   shared with the API's read model). Test: ``::test_idle_partitions_are_left_out_of_fetches``.

Faust's state the worker reads (assignment, group members, recovery, lag) is read here too.
"""

from workers.faust_layer.app import create_app, group_members, owned_partitions, recovered, uncommitted_requests
from workers.faust_layer.consumer import FerryConsumer, FerryTransport
from workers.faust_layer.table import JobsTable, JobStore

__all__ = ["FerryConsumer", "FerryTransport", "JobStore", "JobsTable", "create_app", "group_members",
           "owned_partitions", "recovered", "uncommitted_requests"]
