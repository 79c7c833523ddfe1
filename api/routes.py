"""The async jobs routes: submit (POST) and poll (GET) for each request type."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from api.answers import json_answer
from api.errors import bad_request, not_found, too_large, unavailable
from api.keys import service_key
from api.publisher import JobNotStorable, JobPublisher, PublishRefused, PublishUncertain
from api.read_model import JobReadModel, ViewUnavailable
from api.validation import (
    FORM_RULES,
    JSON_RULES,
    TTL_HEADER,
    Submission,
    check_no_webhook,
    read_form,
    result_ttl_seconds,
    validate_form_submit,
    validate_json_submit,
)
from app.jobs import JobRequest, RequestType, key_fingerprint, rfc3339, utcnow
from app.settings import Settings

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", JobPublisher)
READ_MODEL = web.AppKey("read_model", JobReadModel)

# The contract's path for each request type, under /v1/async/.
PATHS: dict[RequestType, str] = {
    RequestType.text_completion: "completions",
    RequestType.chat_completion: "chat/completions",
    RequestType.responses: "responses",
    RequestType.embedding: "embeddings",
    RequestType.speech: "audio/speech",
    RequestType.transcription: "audio/transcriptions",
    RequestType.image_generation: "images/generations",
    RequestType.image_edit: "images/edits",
    RequestType.image_variation: "images/variations",
    RequestType.rerank: "rerank",
    RequestType.ocr: "ocr",
}


def submit_handler(request_type: RequestType) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def submit(request: web.Request) -> web.Response:
        settings = request.app[SETTINGS]
        check_no_webhook(request.headers.get("x-bf-async-webhook"))
        submission = await _read_submission(request, request_type, settings)
        key = service_key(request)
        job = JobRequest(
            id=str(uuid.uuid4()),
            request_type=request_type,
            created_at=utcnow(),
            ttl_seconds=result_ttl_seconds(request.headers.get(TTL_HEADER), settings.default_result_ttl_seconds,
                                           settings.max_result_ttl_seconds),
            targets=submission.targets,
            body=submission.body,
            files=list(submission.files),
            owner=key_fingerprint(key) if key else None,
        )
        try:
            pending = await request.app[PUBLISHER].publish(job)
        except JobNotStorable as exc:
            raise bad_request(f"invalid request format: the request cannot be stored: {exc}") from None
        except PublishUncertain as exc:
            log.warning("submit of job %s not confirmed by Kafka in time: %s", exc.job_id, exc)
            path = f"/v1/async/{PATHS[request_type]}/{exc.job_id}"
            raise unavailable(f"Kafka did not confirm the job in time, so it may have been queued: poll {path} "
                              "before submitting again (404 there means it was not queued)",
                              exc.retry_after_seconds, job_id=exc.job_id) from None
        except PublishRefused as exc:
            log.warning("submit refused, the job was not queued: %s", exc)
            raise unavailable("the job was not queued: Kafka is unavailable, retry later",
                              exc.retry_after_seconds) from None
        # This replica answers for the job at once, even if Kafka goes away before the pending
        # record comes back through the changelog.
        request.app[READ_MODEL].remember(job.id, pending)
        return json_answer({"id": job.id, "status": "pending", "created_at": rfc3339(job.created_at)}, status=202)

    return submit


async def _read_submission(request: web.Request, request_type: RequestType, settings: Settings) -> Submission:
    # The app admits uploads' larger bodies; a JSON body has its own, smaller limit.
    is_form = request_type in FORM_RULES
    limit = settings.max_upload_bytes if is_form else settings.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if is_form:
        form = await read_form(request, request_type, limit)  # counts what it reads against the limit
        return validate_form_submit(form, request_type, settings.provider_endpoints, settings.max_fallbacks)
    raw = await request.read()
    if len(raw) > limit:
        raise too_large(limit)
    return validate_json_submit(raw, request_type, settings.provider_endpoints, settings.max_fallbacks)


def poll_handler(request_type: RequestType) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def poll(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        try:
            uuid.UUID(job_id)
        except ValueError:
            raise not_found() from None
        try:
            state = await request.app[READ_MODEL].lookup(job_id)
        except ViewUnavailable as exc:
            log.warning("poll of an unknown id while the table view cannot catch up: %s", exc)
            raise unavailable("the job's state cannot be read right now: Kafka is unavailable, retry later",
                              request.app[PUBLISHER].retry_after_seconds()) from None
        if state is None or state.is_expired():
            raise not_found()
        if state.request_type is not request_type:
            raise not_found("operation type mismatch")
        if state.owner is not None:
            key = service_key(request)
            if key is None:
                raise not_found("virtual key is required")
            if key_fingerprint(key) != state.owner:
                raise not_found("virtual key mismatch")
        return json_answer(state.to_wire(), status=200 if state.status.is_terminal else 202)

    return poll


def add_job_routes(api: web.Application) -> None:
    assert set(JSON_RULES) | set(FORM_RULES) == set(PATHS), "every request type needs its submit rules"
    for request_type, path in PATHS.items():
        api.router.add_post(f"/v1/async/{path}", submit_handler(request_type))
        api.router.add_get(f"/v1/async/{path}/{{job_id}}", poll_handler(request_type))


