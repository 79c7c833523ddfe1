"""The expiry index: each job reported once, at or after its expiry, never before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from workers.expiry import ExpiryIndex

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def test_jobs_are_due_at_their_expiry_and_reported_once() -> None:
    index = ExpiryIndex()
    index.add(T0 + timedelta(seconds=10), "late")
    index.add(T0 + timedelta(seconds=1, microseconds=500_000), "soon-a")
    index.add(T0 + timedelta(seconds=2), "soon-b")
    index.add(T0 - timedelta(seconds=5), "past")
    assert len(index) == 4

    assert index.pop_due(T0) == ["past"]
    assert index.pop_due(T0 + timedelta(seconds=1, microseconds=400_000)) == []  # soon-a not yet
    assert sorted(index.pop_due(T0 + timedelta(seconds=2))) == ["soon-a", "soon-b"]
    assert index.pop_due(T0 + timedelta(seconds=2)) == []
    assert index.pop_due(T0 + timedelta(hours=1)) == ["late"]
    assert len(index) == 0


def test_many_jobs_in_one_second_and_clear() -> None:
    index = ExpiryIndex()
    ids = [f"{n:08d}-0000-4000-8000-000000000000" for n in range(5000)]
    for job_id in ids:
        index.add(T0, job_id)
    assert index.pop_due(T0) == ids
    index.add(T0, "x")
    index.clear()
    assert index.pop_due(T0 + timedelta(days=1)) == []
