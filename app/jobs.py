"""The job model, defined once and used by the API and the workers alike.

Three records travel through Kafka, all JSON, all keyed by the job id:

- ``JobRequest``: what the API accepted, on the request topic of its request type;
- ``JobState``: a job's current state, the value of the jobs table (and of its changelog);
- ``JobEvent``: what happened to a job outside a stream (an outcome, a resume or an expiry
  order), on the job-events topic, so that an agent can apply it to the table.

``ErrorObject`` is the contract's error shape, used for every non-2xx answer and for a failed
job's ``error``.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field


class RequestType(str, enum.Enum):
    text_completion = "text_completion"
    chat_completion = "chat_completion"
    responses = "responses"
    embedding = "embedding"
    speech = "speech"
    transcription = "transcription"
    image_generation = "image_generation"
    image_edit = "image_edit"
    image_variation = "image_variation"
    rerank = "rerank"
    ocr = "ocr"


class JobStatus(str, enum.Enum):
    pending = "pending"
    processing = "processing"
    completed = "completed"
    failed = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed)

    @property
    def rank(self) -> int:
        """Order of a job's life; a state never moves to a lower rank."""
        return _RANKS[self]


_RANKS = {JobStatus.pending: 0, JobStatus.processing: 1, JobStatus.completed: 2, JobStatus.failed: 2}


def utcnow() -> datetime:
    return datetime.now(UTC)


_NO_OFFSET = timedelta(0)


def rfc3339(moment: datetime) -> str:
    """UTC, millisecond precision, ``Z`` suffix: ``2026-02-19T08:10:17.831Z``."""
    if moment.utcoffset() != _NO_OFFSET:  # a parsed time's tzinfo is pydantic's UTC, not datetime's
        moment = moment.astimezone(UTC)
    # isoformat is about twice as fast as strftime, and pads a year below 1000 as RFC 3339 wants.
    return moment.isoformat(timespec="milliseconds")[:23] + "Z"


def key_fingerprint(key: str) -> str:
    """What a job stores of its owner's service key: a SHA-256, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        return cls.model_validate_json(raw)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    event_id: str | None = None


class ErrorObject(BaseModel):
    """The contract's error object; ``is_bifrost_error`` is False for provider errors."""

    model_config = ConfigDict(frozen=True)

    is_bifrost_error: bool
    error: ErrorDetail
    status_code: int | None = None
    type: str | None = None
    event_id: str | None = None
    extra_fields: dict[str, Any] = Field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        # extra_fields is always present (possibly {}); other optional fields only when set.
        body = self.model_dump(mode="json", exclude_none=True)
        body["extra_fields"] = self.extra_fields
        return body


class Target(BaseModel):
    """One ``provider/model`` to try."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str

    @classmethod
    def parse(cls, name: str) -> Target:
        """Split on the first slash only: ``openrouter/meta-llama/llama-3``."""
        provider, _, model = name.partition("/")
        return cls(provider=provider, model=model)

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class UploadedFile(BaseModel):
    """A file part of a multipart submit (audio, image, mask); its bytes travel in the record."""

    # Base64 in JSON: the request record stays one JSON document, at 4/3 of the file's size.
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    field: str  # the form field it came in: file, image, image[], mask
    filename: str
    content_type: str
    data: bytes = Field(repr=False)


class JobRequest(_Record):
    """An accepted request, as published to its request topic."""

    id: str
    request_type: RequestType
    created_at: datetime
    ttl_seconds: int
    targets: list[Target]  # the primary first, then the fallbacks in order
    body: dict[str, Any]  # the client's body (or form fields), untouched but for model and fallbacks
    files: list[UploadedFile] = Field(default_factory=list)  # multipart submits only
    owner: str | None = None  # key_fingerprint of the submitting service key


class RequestLocation(BaseModel):
    """Where a job's request sits in Kafka, so that a new owner can read it again."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int


class RetryInfo(BaseModel):
    """Why a processing job is waiting: the failed call it will retry, and when."""

    model_config = ConfigDict(frozen=True)

    target: str
    attempt: int  # the call that failed (1 = the first call to this target)
    status_code: int
    next_attempt_at: datetime


class JobState(_Record):
    """A job's state: the value of the jobs table, and what GET renders."""

    id: str
    request_type: RequestType
    status: JobStatus
    created_at: datetime
    ttl_seconds: int
    owner: str | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    status_code: int | None = None
    result: dict[str, Any] | None = None
    error: ErrorObject | None = None
    attempts: int = 0  # how many workers have started this job
    request: RequestLocation | None = None
    runner: str | None = None  # the worker that started the latest attempt (its group member URL)
    retry: RetryInfo | None = None  # set while a processing job waits to retry a provider call
    # Set while a pending job waits in its provider's lane: the provider; its request stays in
    # Kafka at ``request`` until the lane starts it.
    waiting_for: str | None = None

    @classmethod
    def pending(cls, request: JobRequest) -> JobState:
        return cls(
            id=request.id, request_type=request.request_type, status=JobStatus.pending,
            created_at=request.created_at, ttl_seconds=request.ttl_seconds, owner=request.owner,
        )

    def waiting(self, location: RequestLocation, provider: str) -> JobState:
        return self.model_copy(update={"request": location, "waiting_for": provider})

    def processing(self, location: RequestLocation, runner: str | None = None) -> JobState:
        return self.model_copy(update={
            "status": JobStatus.processing, "attempts": self.attempts + 1, "request": location, "retry": None,
            "runner": runner, "waiting_for": None,
        })

    def retrying(self, retry: RetryInfo) -> JobState:
        return self.model_copy(update={"retry": retry})

    def finished(self, outcome: Outcome, at: datetime | None = None) -> JobState:
        at = at or utcnow()
        status = JobStatus.completed if outcome.error is None else JobStatus.failed
        return self.model_copy(update={
            "status": status, "completed_at": at, "expires_at": at + timedelta(seconds=self.ttl_seconds),
            "status_code": outcome.status_code, "result": outcome.result, "error": outcome.error, "retry": None,
        })

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    def to_wire(self) -> dict[str, Any]:
        """The contract's job object."""
        body: dict[str, Any] = {"id": self.id, "status": self.status.value, "created_at": rfc3339(self.created_at)}
        if self.retry is not None and self.status is JobStatus.processing:
            # Beyond the contract: a processing job says that it is retrying, and when.
            when = rfc3339(self.retry.next_attempt_at)
            body["retry"] = self.retry.model_dump(mode="json") | {"next_attempt_at": when}
        if self.status.is_terminal:
            # finished() sets both times, and the error of a failed job; a state without them is corrupt.
            if self.completed_at is None or self.expires_at is None:
                raise ValueError(f"job {self.id} is {self.status.value} but has no completed_at or expires_at")
            body["completed_at"] = rfc3339(self.completed_at)
            body["expires_at"] = rfc3339(self.expires_at)
            body["status_code"] = self.status_code
            if self.status is JobStatus.completed:
                body["result"] = self.result
            elif self.error is None:
                raise ValueError(f"job {self.id} failed but has no error")
            else:
                body["error"] = self.error.to_json_dict()
        return body


class Outcome(BaseModel):
    """How a job ended: a result (status 200) or an error."""

    model_config = ConfigDict(frozen=True)

    status_code: int
    result: dict[str, Any] | None = None
    error: ErrorObject | None = None


class JobEvent(_Record):
    """A call's outcome or retry report; on the job-events topic, an outcome whose job's
    partition moved to another worker during the call (its new owner writes it)."""

    id: str
    # Only "outcome" and "retrying" are made; the others are orders that earlier versions sent
    # and that a topic may still hold after an upgrade: read, and ignored.
    kind: Literal["outcome", "retrying", "resume", "expire", "catch_up"]
    outcome: Outcome | None = None
    retry: RetryInfo | None = None
