"""Fake OpenAI-family servers on loopback: OpenAI itself, Azure OpenAI, and Mistral (with OCR).

``FakeOpenAI`` speaks OpenAI's wire format under ``/v1``: ``Authorization: Bearer``, every
endpoint Ferry calls (completions, chat, responses, embeddings, audio speech and
transcriptions, image generations, edits and variations; and ``/rerank`` as Together and vLLM
serve it), real response objects, OpenAI's error bodies (``{"error": {"message", "type",
"param", "code"}}``) and ``Retry-After`` on 429. Multipart endpoints record the files they got.

``FakeAzureOpenAI`` serves the same under ``/openai/deployments/<deployment>/...``, wanting an
``api-version`` query parameter and an ``api-key`` header. ``FakeMistral`` adds ``/v1/ocr`` and
answers errors in Mistral's shape (``{"object": "error", "message", "type", "param", "code"}``).

Behaviour is controllable per server (see ``deploy/fakes/base.py``) and, on JSON endpoints,
per request by a body field that Ferry forwards untouched like any unknown field::

    {"model": "openai/gpt-4o-mini", "messages": [...],
     "x_fake": {"latency": 0.5, "status": 429, "retry_after": 2}}

Run it alone: ``python -m deploy.fakes.openai_server --port 8099 [--latency 0.2] [--api-key K]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

from deploy.fakes.base import LISTEN_BACKLOG, FakeProvider
from deploy.fakes.media import png_bytes, wav_bytes

# OpenAI's own error bodies, by status.
ERRORS: dict[int, dict[str, Any]] = {
    400: {"message": "Invalid request.", "type": "invalid_request_error", "param": None, "code": None},
    401: {"message": "Incorrect API key provided. You can find your API key at "
                     "https://platform.openai.com/account/api-keys.",
          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"},
    404: {"message": "The model does not exist or you do not have access to it.",
          "type": "invalid_request_error", "param": None, "code": "model_not_found"},
    429: {"message": "Rate limit reached for requests. Please try again later.",
          "type": "requests", "param": None, "code": "rate_limit_exceeded"},
    500: {"message": "The server had an error while processing your request. Sorry about that!",
          "type": "server_error", "param": None, "code": None},
    503: {"message": "The engine is currently overloaded, please try again later.",
          "type": "server_error", "param": None, "code": None},
}

SPEECH_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
                "wav": "audio/wav", "pcm": "audio/pcm"}


def tokens(value: Any) -> int:
    return max(1, len(str(value).split()))


def vector(text: str, dimensions: int = 8) -> list[float]:
    """A deterministic embedding: the same text always has the same vector."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255, 6) for byte in digest[:dimensions]]


@dataclass
class FakeOpenAI(FakeProvider):
    accepts_directives = True
    # (path under /v1, handler name, required fields with OpenAI's message)
    ROUTES: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
        ("/completions", "_completions", ("prompt",)),
        ("/chat/completions", "_chat_completions", ("messages",)),
        ("/responses", "_responses", ("input",)),
        ("/embeddings", "_embeddings", ("input",)),
        ("/audio/speech", "_speech", ("input", "voice")),
        ("/audio/transcriptions", "_transcriptions", ()),
        ("/images/generations", "_image_generations", ("prompt",)),
        ("/images/edits", "_image_edits", ("prompt",)),
        ("/images/variations", "_image_variations", ()),
        ("/rerank", "_rerank", ("query", "documents")),
    )

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for path, handler, required in self.ROUTES:
            router.add_post(f"/v1{path}", self._endpoint(getattr(self, handler), required))

    def authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        error = dict(ERRORS.get(status, ERRORS[500]))
        if message:
            error["message"] = message
        if param:
            error["param"] = param
        return web.json_response({"error": error}, status=status, headers=self.retry_after_header(retry_after))

    def model_of(self, request: web.Request, body: dict[str, Any]) -> str | None:
        return body.get("model")

    def _endpoint(self, handler, required: tuple[str, ...]):
        async def endpoint(request: web.Request) -> web.StreamResponse:
            admission = await self.admit(request)
            if admission.refusal is not None:
                return admission.refusal
            body = admission.body
            model = self.model_of(request, body)
            if not model:
                return self.error(400, message="you must provide a model parameter", param="model")
            for name in required:
                if not body.get(name):
                    return self.error(400, message=f"'{name}' is a required property", param=name)
            return await handler(model, body, admission.files)
        return endpoint

    # -- the endpoints ----------------------------------------------------------------------------------

    async def _completions(self, model: str, body: dict, files: dict) -> web.Response:
        prompt_tokens = tokens(body["prompt"])
        return web.json_response({
            "id": f"cmpl-fake{self.next_id()}", "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": f"echo: {body['prompt']}", "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2, "total_tokens": prompt_tokens + 2},
        })

    async def _chat_completions(self, model: str, body: dict, files: dict) -> web.Response:
        last = body["messages"][-1]
        prompt = last.get("content") if isinstance(last, dict) else None
        text = f"echo: {prompt}" if isinstance(prompt, str) else "echo"
        prompt_tokens = sum(tokens(m) for m in body["messages"])
        completion_tokens = tokens(text)
        return web.json_response({
            "id": f"chatcmpl-fake{self.next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _responses(self, model: str, body: dict, files: dict) -> web.Response:
        text = f"echo: {body['input']}" if isinstance(body["input"], str) else "echo"
        number = self.next_id()
        return web.json_response({
            "id": f"resp_fake{number}", "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": model, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "temperature": 1.0, "top_p": 1.0, "metadata": {},
            "output": [{"type": "message", "id": f"msg_fake{number}", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": tokens(body["input"]), "output_tokens": tokens(text),
                      "total_tokens": tokens(body["input"]) + tokens(text),
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        })

    async def _embeddings(self, model: str, body: dict, files: dict) -> web.Response:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimensions = int(body.get("dimensions") or 8)
        used = sum(tokens(text) for text in inputs)
        return web.json_response({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vector(str(text), dimensions)}
                     for i, text in enumerate(inputs)],
            "usage": {"prompt_tokens": used, "total_tokens": used},
        })

    async def _speech(self, model: str, body: dict, files: dict) -> web.Response:
        audio_format = body.get("response_format", "mp3")
        if audio_format not in SPEECH_TYPES:
            return self.error(400, message=f"Invalid value: '{audio_format}'.", param="response_format")
        # Real audio (a WAV) whatever the format asked: the bytes are what Ferry must carry.
        audio = wav_bytes(min(0.05 * len(body["input"]), 30.0))
        return web.Response(body=audio, content_type=SPEECH_TYPES[audio_format])

    async def _transcriptions(self, model: str, body: dict, files: dict) -> web.Response:
        uploads = files.get("file")
        if not uploads:
            return self.error(400, message="'file' is a required property", param="file")
        data = uploads[0].data
        text = f"heard {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
        response_format = body.get("response_format", "json")
        if response_format in ("text", "srt", "vtt"):
            return web.Response(text=text, content_type="text/plain")
        result: dict[str, Any] = {"text": text, "usage": {"type": "duration", "seconds": 1}}
        if response_format == "verbose_json":
            result |= {"task": "transcribe", "language": body.get("language", "english"), "duration": 1.0,
                       "segments": []}
        return web.json_response(result)

    def _images(self, body: dict, source: bytes | None = None) -> web.Response:
        count = int(body.get("n") or 1)
        image = png_bytes(4, 4) if source is None else source
        item = ({"url": f"https://fake.invalid/images/{self.next_id()}.png"}
                if body.get("response_format") == "url" else {"b64_json": base64.b64encode(image).decode()})
        return web.json_response({"created": int(time.time()), "data": [item] * count})

    async def _image_generations(self, model: str, body: dict, files: dict) -> web.Response:
        return self._images(body)

    async def _image_edits(self, model: str, body: dict, files: dict) -> web.Response:
        images = files.get("image") or files.get("image[]")
        if not images:
            return self.error(400, message="'image' is a required property", param="image")
        return self._images(body, source=images[0].data)  # the "edit" gives the image back

    async def _image_variations(self, model: str, body: dict, files: dict) -> web.Response:
        if not files.get("image"):
            return self.error(400, message="'image' is a required property", param="image")
        return self._images(body, source=files["image"][0].data)

    async def _rerank(self, model: str, body: dict, files: dict) -> web.Response:
        """Together's and vLLM's rerank: documents scored by words shared with the query."""
        query = set(str(body["query"]).lower().split())
        scored: list[dict[str, Any]] = []
        for index, document in enumerate(body["documents"]):
            text = document if isinstance(document, str) else document.get("text", "")
            words = set(text.lower().split())
            scored.append({"index": index, "relevance_score": round(len(query & words) / (len(words) or 1), 6),
                           "document": {"text": text}})
        scored.sort(key=lambda item: -item["relevance_score"])
        return web.json_response({"id": f"rerank-fake{self.next_id()}", "object": "rerank", "model": model,
                                  "results": scored[: body.get("top_n") or len(scored)],
                                  "usage": {"total_tokens": tokens(body["query"])}})


@dataclass
class FakeAzureOpenAI(FakeOpenAI):
    """Azure OpenAI: deployments in the path, ``api-version`` required, ``api-key`` header."""

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for path, handler, required in self.ROUTES:
            if path != "/rerank":
                router.add_post(f"/openai/deployments/{{deployment}}{path}",
                                self._with_version(self._endpoint(getattr(self, handler), required)))

    def _with_version(self, endpoint):
        async def versioned(request: web.Request) -> web.StreamResponse:
            if not request.query.get("api-version"):
                return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
            return await endpoint(request)
        return versioned

    def authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("api-key") == self.api_key

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        if status == 401:
            return web.json_response({"error": {"code": "401", "message": "Access denied due to invalid "
                                      "subscription key or wrong API endpoint. Make sure to provide a valid key "
                                      "for an active subscription and use a correct regional API endpoint for "
                                      "your resource."}}, status=401)
        return super().error(status, retry_after, message, param)

    def model_of(self, request: web.Request, body: dict[str, Any]) -> str | None:
        return request.match_info["deployment"]


@dataclass
class FakeMistral(FakeOpenAI):
    """Mistral: OpenAI-compatible chat and embeddings, plus OCR, with its own error shape."""

    ROUTES = (
        ("/chat/completions", "_chat_completions", ("messages",)),
        ("/embeddings", "_embeddings", ("input",)),
        ("/ocr", "_ocr", ("document",)),
    )

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        kinds = {401: "Unauthorized", 429: "Requests rate limit exceeded"}
        body = {"object": "error", "message": message or kinds.get(status, "Internal server error"),
                "type": "invalid_request_error" if status < 500 else "internal_server_error",
                "param": param, "code": None}
        if status in (401, 429) and not message:
            body = {"message": kinds[status], "request_id": f"req-{self.next_id()}"}
        return web.json_response(body, status=status, headers=self.retry_after_header(retry_after))

    async def _ocr(self, model: str, body: dict, files: dict) -> web.Response:
        document = body["document"]
        kind = document.get("type") if isinstance(document, dict) else None
        if kind not in ("document_url", "image_url"):
            return self.error(422, message="document: Input should be a valid document_url or image_url chunk",
                              param="document")
        source = document.get(kind)
        return web.json_response({
            "pages": [{"index": 0, "markdown": f"# Page 1\n\nRead from {source}",
                       "images": [], "dimensions": {"dpi": 200, "height": 2200, "width": 1700}}],
            "model": model,
            "usage_info": {"pages_processed": 1, "doc_size_bytes": None},
        })


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.fakes.openai_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    args = parser.parse_args()
    fake = FakeOpenAI(api_key=args.api_key, latency=args.latency)
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, access_log=None, backlog=LISTEN_BACKLOG,
                print=lambda _: print(f"fake OpenAI-compatible provider on http://127.0.0.1:{args.port}/v1"))


if __name__ == "__main__":
    main()
