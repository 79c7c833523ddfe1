"""The job model renders the contract's job object, and never walks a job backwards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from app.jobs import (
    ErrorDetail,
    ErrorObject,
    JobRequest,
    JobState,
    JobStatus,
    Outcome,
    RequestLocation,
    RequestType,
    Target,
    rfc3339,
)

CREATED = datetime(2026, 2, 19, 8, 10, 17, 831000, tzinfo=UTC)
REQUEST = JobRequest(id="1e89b165-d4fe-49e8-beb2-3e157f2df02f", request_type=RequestType.chat_completion,
                     created_at=CREATED, ttl_seconds=3600, targets=[Target.parse("openai/gpt-4o")], body={})
LOCATION = RequestLocation(topic="t", partition=0, offset=5)


def test_pending_job_object_has_only_id_status_created_at() -> None:
    assert JobState.pending(REQUEST).to_wire() == {
        "id": REQUEST.id, "status": "pending", "created_at": "2026-02-19T08:10:17.831Z"}


def test_completed_job_object() -> None:
    done_at = datetime(2026, 2, 19, 8, 10, 19, 2000, tzinfo=UTC)
    state = JobState.pending(REQUEST).processing(LOCATION).finished(Outcome(status_code=200, result={"a": 1}), done_at)
    assert state.attempts == 1
    assert state.to_wire() == {
        "id": REQUEST.id, "status": "completed", "created_at": "2026-02-19T08:10:17.831Z",
        "completed_at": "2026-02-19T08:10:19.002Z", "expires_at": "2026-02-19T09:10:19.002Z",
        "status_code": 200, "result": {"a": 1}}
    assert JobState.from_bytes(state.to_bytes()) == state


def test_failed_job_object_carries_the_error_shape() -> None:
    error = ErrorObject(is_bifrost_error=False, status_code=429, error=ErrorDetail(message="slow down"),
                        extra_fields={"provider": "openai"})
    state = JobState.pending(REQUEST).processing(LOCATION).finished(Outcome(status_code=429, error=error))
    wire = state.to_wire()
    assert wire["status"] == "failed" and wire["status_code"] == 429 and "result" not in wire
    assert wire["error"] == {"is_bifrost_error": False, "status_code": 429, "error": {"message": "slow down"},
                             "extra_fields": {"provider": "openai"}}


def test_status_ranks_order_a_jobs_life() -> None:
    assert JobStatus.pending.rank < JobStatus.processing.rank < JobStatus.completed.rank == JobStatus.failed.rank


def test_rfc3339_is_utc_milliseconds() -> None:
    assert rfc3339(CREATED) == "2026-02-19T08:10:17.831Z"


def test_rfc3339_converts_any_offset_and_pads_the_year() -> None:
    parsed = JobState.from_bytes(JobState.pending(REQUEST).to_bytes()).created_at  # pydantic's own UTC tzinfo
    assert rfc3339(parsed) == "2026-02-19T08:10:17.831Z"
    assert rfc3339(datetime(2026, 2, 19, 10, 10, 17, 831999, tzinfo=timezone(timedelta(hours=2)))) == \
        "2026-02-19T08:10:17.831Z"
    # RFC 3339 years have four digits; strftime's %Y wrote "1-01-01T..." for this one.
    assert rfc3339(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000Z"
