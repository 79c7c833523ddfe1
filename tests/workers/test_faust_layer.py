"""Direct reproductions, against a real broker, of the faust-streaming 0.15.3 defects that
``workers.faust_layer`` fixes; each test fails with Faust's own classes and passes with Ferry's.

The scenarios live in tests/workers/faust_repro.py with the classes under test as parameters.
Test, defect (faust-streaming 0.15.3 file:line) and upstream issue:

- ``test_records_fetched_while_recovery_ends_are_all_delivered``: a fresh group's records handed
  over while recovery has emptied the active partition set are discarded by ``Consumer.getmany``
  (consumer.py:758-763), ``perform_seek`` does not rewind a partition without a committed offset
  (aiokafka ``seek_to_committed``), and the first commit passes them (``_new_offset``,
  consumer.py:1139). Upstream: #216 (recovery resumes before seeking),
  #221 and PR #223 (records fetched across a rebalance).
- ``test_records_getmany_discards_are_fetched_again``: ``getmany`` drops what aiokafka handed over
  while a partition is not active (consumer.py:758-763) or the flow is stopped (consumer.py:748-749,
  767-774) without seeking back. Upstream: #216, #221 / PR #223.
- ``test_a_hand_over_across_a_rebalance_drops_nothing``: a record whose hand-over waits across a
  rebalance reaches its stream with the old generation and is skipped (streams.py:1287-1300), and
  ``_drain_messages`` still sets the read offset to it (consumer.py:1220-1223): the records before
  it, cleared from the stream's buffer and fetched again from the committed offset, are dropped as
  read already. Upstream: #221 / PR #223 (records of an older generation).
- ``test_records_handed_over_before_the_flow_resumes_are_kept``: at the end of recovery Faust
  resumes and seeks the stream partitions, then calls ``flow_control.resume()``, which clears every
  stream's buffer (mode/utils/queues.py ``FlowControlEvent.resume``; faust/tables/recovery.py
  ``on_recovery_completed``): records handed over in between are lost, the consumer past them.
- ``test_an_idle_fetcher_wakes_when_a_partition_is_resumed``: with no partition active,
  ``_wait_next_records`` sleeps a whole second (consumer.py:806-808) and does not wake when a
  partition is resumed: the stream partitions resumed as recovery ends waited that second before
  their first fetch, at every rebalance.
- ``test_a_commit_stops_at_the_first_unacked_record``: ``_new_offset`` skips its head-gap check when
  nothing is committed (``if committed_offset:``, consumer.py:1139) and lets one unacked head record
  through when something is (``min(acked) - committed > 1``, consumer.py:1140). Upstream: #606.
- ``test_streams_keep_flowing_while_table_writes_wait``: the conductor waits for Faust's producer
  buffer before every record while more than 100 table writes wait in it (transport/producer.py:30,
  wait_until_ebb; conductor.py:111). Upstream: #173 (producer buffer full).
- ``test_the_stall_check_skips_a_partition_not_yet_positioned``: the livelock detector's
  ``verify_event_path`` reads ``tp_state.position`` (drivers/aiokafka.py:840), an assertion in
  aiokafka while a just-assigned partition awaits its reset: the worker crashed.
- ``test_records_recovery_read_are_in_the_table``: changelog records recovery reads past the
  highwater it measured (another writer's, written meanwhile) are kept in a buffer once recovery has
  ended, applied only at the next rebalance (tables/recovery.py ``_slurp_changelogs``,
  ``flush_buffers`` from ``on_partitions_revoked``), over the values the owner wrote since, whose
  offsets the next recovery starts after (``_on_changelog_sent``, tables/base.py:353); and records
  still in the changelog queue when recovery resumes the flow are thrown away
  (``clear_on_resume=True``, tables/manager.py:112-115; mode ``FlowControlEvent.resume``), the
  consumer past them.
- ``test_the_seek_to_committed_asks_once``: at each assignment ``perform_seek`` calls aiokafka's
  ``seek_to_committed``, which asks the group coordinator for one partition at a time (aiokafka
  consumer.py ``seek_to_committed`` -> ``committed``): about a hundred round trips per rebalance.
- ``test_an_offset_lookup_waits_behind_no_long_fetch``: Faust's consumer asks the broker to hold
  each fetch 1,500 ms (drivers/aiokafka.py ``_create_worker_consumer``), and an offset lookup on
  the same connection is answered only after it.
- ``test_a_standby_read_past_a_lagging_highwater_is_no_crash``: recovery's check that no store is
  ahead of its changelog compares a standby's live read offset (``standby_offsets``, moved by the
  records read during the active recovery) with a highwater looked up after them
  (tables/recovery.py ``_restart_recovery``, ``E_PERSISTED_OFFSET``): an answer that lags those
  records (a leader elected moments before) raised ``ConsistencyError``. Upstream: #158.
- ``test_idle_partitions_are_left_out_of_fetches``: aiokafka sends every fetch as a full one
  (consumer/fetcher.py ``_get_actions_per_node``, protocol/fetch.py: session id 0, epoch -1),
  naming each partition the worker reads (about a hundred) however few have records; Ferry's
  consumer fetches within Kafka fetch sessions (KIP-227, ``app/fetch_sessions.py``).
"""

from __future__ import annotations

import pytest

from app.settings import Settings
from tests.workers import faust_repro
from workers.faust_layer import FerryTransport, JobsTable


@pytest.mark.timeout(300)
async def test_records_fetched_while_recovery_ends_are_all_delivered(settings: Settings) -> None:
    await faust_repro.check_records_fetched_during_recovery_are_delivered(settings, FerryTransport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["inactive", "flow_stopped"])
async def test_records_getmany_discards_are_fetched_again(settings: Settings, how: str) -> None:
    await faust_repro.check_discarded_records_are_fetched_again(settings, FerryTransport, how)


@pytest.mark.timeout(300)
async def test_a_hand_over_across_a_rebalance_drops_nothing(settings: Settings) -> None:
    await faust_repro.check_a_hand_over_across_a_rebalance_drops_nothing(settings, FerryTransport)


@pytest.mark.timeout(300)
async def test_records_handed_over_before_the_flow_resumes_are_kept(settings: Settings) -> None:
    await faust_repro.check_records_handed_over_before_the_flow_resumes_are_kept(settings, FerryTransport)


@pytest.mark.timeout(300)
async def test_an_idle_fetcher_wakes_when_a_partition_is_resumed(settings: Settings) -> None:
    await faust_repro.check_an_idle_fetcher_wakes_when_a_partition_is_resumed(settings, FerryTransport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("committed_before", [None, 5], ids=["nothing-committed", "committed-5"])
async def test_a_commit_stops_at_the_first_unacked_record(settings: Settings, committed_before: int | None) -> None:
    await faust_repro.check_commit_stops_at_the_first_unacked_record(settings, FerryTransport, committed_before)


@pytest.mark.timeout(300)
async def test_streams_keep_flowing_while_table_writes_wait(settings: Settings) -> None:
    await faust_repro.check_streams_flow_while_table_writes_wait(settings, FerryTransport, JobsTable)


@pytest.mark.timeout(300)
async def test_the_stall_check_skips_a_partition_not_yet_positioned(settings: Settings) -> None:
    await faust_repro.check_the_stall_check_skips_a_partition_not_yet_positioned(settings, FerryTransport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hold", [False, True], ids=["buffered", "queue-cleared"])
async def test_records_recovery_read_are_in_the_table(settings: Settings, hold: bool) -> None:
    await faust_repro.check_records_recovery_read_are_in_the_table(settings, FerryTransport, JobsTable, hold)


@pytest.mark.timeout(300)
async def test_the_seek_to_committed_asks_once(settings: Settings) -> None:
    await faust_repro.check_the_seek_to_committed_asks_once(settings, FerryTransport)


@pytest.mark.timeout(300)
async def test_an_offset_lookup_waits_behind_no_long_fetch(settings: Settings) -> None:
    await faust_repro.check_an_offset_lookup_waits_behind_no_long_fetch(settings, FerryTransport)


@pytest.mark.timeout(300)
async def test_a_standby_read_past_a_lagging_highwater_is_no_crash(settings: Settings) -> None:
    await faust_repro.check_a_standby_read_past_a_lagging_highwater_is_no_crash(settings, FerryTransport)


@pytest.mark.timeout(300)
async def test_an_active_store_past_a_lagging_highwater_is_no_crash(settings: Settings) -> None:
    await faust_repro.check_an_active_store_past_a_lagging_highwater(settings, FerryTransport, "once")


@pytest.mark.timeout(300)
async def test_a_store_ahead_of_its_changelog_still_crashes(settings: Settings) -> None:
    await faust_repro.check_an_active_store_past_a_lagging_highwater(settings, FerryTransport, "always")


@pytest.mark.timeout(300)
async def test_idle_partitions_are_left_out_of_fetches(settings: Settings) -> None:
    await faust_repro.check_idle_partitions_are_left_out_of_fetches(settings, FerryTransport)
