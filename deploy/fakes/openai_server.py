"""A fake OpenAI-compatible server on loopback, for the tests and for trying Ferry without a key.

It speaks OpenAI's wire format: ``POST /v1/chat/completions`` with ``Authorization: Bearer``,
answering a real ``chat.completion`` object, or OpenAI's error bodies
(``{"error": {"message", "type", "param", "code"}}``) with ``Retry-After`` on 429.

Behaviour is controllable per server (``FakeOpenAI.latency``, ``fail_next``) and per request, by
a body field that Ferry forwards untouched like any unknown field::

    {"model": "fake/gpt-4o-mini", "messages": [...],
     "x_fake": {"latency": 0.5, "status": 429, "retry_after": 2}}

Run it alone: ``python -m deploy.fakes.openai_server --port 8099 [--latency 0.2] [--api-key K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

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


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float  # time.monotonic()


@dataclass
class FakeOpenAI:
    """The server and its knobs; ``requests`` records what it received, newest last."""

    api_key: str | None = None
    latency: float = 0.0
    fail_next: list[tuple[int, float | None]] = field(default_factory=list)  # (status, retry_after)
    requests: deque = field(default_factory=lambda: deque(maxlen=100_000))
    calls: int = 0
    on_request: Callable[[dict[str, Any]], None] | None = None  # a test's hook, called on arrival
    _runner: web.AppRunner | None = None
    port: int | None = None
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        return app

    async def start(self, port: int = 0) -> "FakeOpenAI":
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @staticmethod
    def _error(status: int, retry_after: float | None = None, message: str | None = None,
               param: str | None = None) -> web.Response:
        error = dict(ERRORS.get(status, ERRORS[500]))
        if message:
            error["message"] = message
        if param:
            error["param"] = param
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return web.json_response({"error": error}, status=status, headers=headers)

    async def _chat_completions(self, request: web.Request) -> web.Response:
        self.calls += 1
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, message="We could not parse the JSON body of your request.")
        self.requests.append(ReceivedRequest(request.path, dict(request.headers), body, time.monotonic()))
        if self.on_request is not None:
            self.on_request(body)
        directives = body.get("x_fake") or {}
        latency = float(directives.get("latency", self.latency))
        if latency:
            await asyncio.sleep(latency)
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401)
        if self.fail_next:
            status, retry_after = self.fail_next.pop(0)
            return self._error(status, retry_after)
        if "status" in directives:
            return self._error(int(directives["status"]), directives.get("retry_after"))
        if not body.get("model"):
            return self._error(400, message="you must provide a model parameter", param="model")
        if not body.get("messages"):
            return self._error(400, message="'messages' is a required property", param="messages")
        return web.json_response(self._completion(body))

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]
        prompt = last.get("content") if isinstance(last, dict) else None
        text = f"echo: {prompt}" if isinstance(prompt, str) else "echo"
        prompt_tokens = sum(len(str(m).split()) for m in body["messages"])
        completion_tokens = len(text.split())
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.fakes.openai_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    args = parser.parse_args()
    fake = FakeOpenAI(api_key=args.api_key, latency=args.latency)
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, access_log=None,
                print=lambda _: print(f"fake OpenAI-compatible provider on http://127.0.0.1:{args.port}/v1"))


if __name__ == "__main__":
    main()
