"""JSON answers are valid, compact JSON whatever the body holds, and the view's parse cache never
serves a state older than the latest record."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from api.answers import json_answer, json_bytes
from api.read_model import RECENT_STATES, JobReadModel
from app.jobs import JobState, JobStatus, Outcome, RequestType
from app.settings import Settings


def test_a_body_orjson_refuses_is_still_written_exactly() -> None:
    # A provider's result may hold an integer beyond 64 bits, and a dict may have non-string keys.
    for body in ({"result": {"seed": 2**70, "negative": -(2**80)}}, {"counts": {1: "one"}}):
        written = json_bytes(body)
        assert json.loads(written) == json.loads(json.dumps(body)), written
        assert b", " not in written and b": " not in written
    assert json_bytes({"text": "é\u2028", "list": [1, None]}) == '{"text":"é\u2028","list":[1,null]}'.encode()


def test_an_answer_is_json_with_its_status_and_headers() -> None:
    answer = json_answer({"id": "x"}, status=202, headers={"Retry-After": "3"})
    assert (answer.status, answer.content_type, answer.charset) == (202, "application/json", "utf-8")
    assert answer.headers["Retry-After"] == "3"
    assert json.loads(answer.body) == {"id": "x"}


def test_the_view_answers_each_new_record_not_a_kept_parse() -> None:
    view = JobReadModel(Settings())
    pending = JobState(id="job-1", request_type=RequestType.chat_completion, status=JobStatus.pending,
                       created_at=datetime.now(UTC), ttl_seconds=3600)
    view.remember(pending.id, pending.to_bytes())
    assert view.get("job-1") == pending and view.get("job-1") is view.get("job-1")  # parsed once, kept
    done = pending.finished(Outcome(status_code=200, result={"n": 1}))
    view.remember(done.id, done.to_bytes())
    assert view.get("job-1") == done
    view._apply("job-1", None)  # a tombstone
    assert view.get("job-1") is None


def test_the_views_kept_parses_are_bounded() -> None:
    view = JobReadModel(Settings())
    for number in range(RECENT_STATES + 10):
        state = JobState(id=f"job-{number}", request_type=RequestType.embedding, status=JobStatus.pending,
                         created_at=datetime.now(UTC), ttl_seconds=60)
        view.remember(state.id, state.to_bytes())
        assert view.get(f"job-{number}") is not None
    assert len(view._recent) == RECENT_STATES
    assert view.get("job-0") is not None  # evicted from the kept parses, still in the view
