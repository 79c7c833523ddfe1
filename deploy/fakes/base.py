"""What every fake provider server shares: loopback serving, knobs, and a record of requests.

A provider's fake subclasses ``FakeProvider``, adds its routes (``add_routes``), says how it
checks the key (``authorized``) and how it writes an error body (``error``). Each route handler
starts with ``answer = await self.admit(request)``: that records the request, waits the
configured latency, and answers with an error when the key is wrong or a failure is scripted.

Knobs, per server: ``latency`` (seconds before each answer), ``fail_next`` (a list of
``(status, retry_after)`` to answer in turn; ``retry_after`` in seconds, or a string sent as the
``Retry-After`` header as is, such as an HTTP date), ``garbage_next`` (how many of the next
answers are a 200 with an HTML page instead of the provider's JSON, as a proxy in front of it
may send), ``on_request`` (a hook called with each recorded request), ``hold_answers()`` /
``release_answers()`` (calls received meanwhile wait, after their latency, before answering).
``in_flight`` counts the calls received and not yet answered (a test reads it, for instance to
know how many calls a worker killed at that moment had under way). Bodies of OpenAI-compatible
fakes may also carry ``x_fake`` directives (see ``openai_server``); the others' real APIs refuse
unknown fields, so their fakes do too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

# Connections a fake queues before accepting them. aiohttp's default of 128 overflowed when a
# worker opened thousands of connections at once (the in-flight benchmark), and each dropped
# connection attempt waited for TCP's retransmission (1 s, then 3 s...), so the benchmark timed
# the kernel's retries rather than the calls. Real providers sit behind load balancers that do
# not refuse so early.
LISTEN_BACKLOG = 4096


@dataclass
class ReceivedFile:
    filename: str | None
    content_type: str | None
    data: bytes = field(repr=False)


@dataclass
class ReceivedRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]  # the JSON body, or a multipart form's text fields
    files: dict[str, list[ReceivedFile]]  # a multipart form's files by field
    received_at: float  # time.monotonic()


@dataclass
class Admission:
    body: dict[str, Any]
    files: dict[str, list[ReceivedFile]]
    refusal: web.Response | None = None  # answer this instead of the real thing


@dataclass
class FakeProvider:
    """The server and its knobs; ``requests`` records what it received, newest last."""

    api_key: str | None = None
    latency: float = 0.0
    fail_next: list[tuple[int, float | str | None]] = field(default_factory=list)  # (status, retry_after)
    garbage_next: int = 0
    requests: deque = field(default_factory=lambda: deque(maxlen=100_000))
    calls: int = 0
    on_request: Callable[[ReceivedRequest], None] | None = None
    port: int | None = None
    in_flight: int = 0
    _answering: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self._answering.set()

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        @web.middleware
        async def count_in_flight(request: web.Request, handler) -> web.StreamResponse:
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[count_in_flight])
        self.add_routes(app.router)
        return app

    async def start(self, port: int = 0) -> FakeProvider:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=LISTEN_BACKLOG)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def hold_answers(self) -> None:
        """Calls wait before answering until ``release_answers``."""
        self._answering.clear()

    def release_answers(self) -> None:
        self._answering.set()

    def next_id(self) -> int:
        return next(self._ids)

    # -- what a provider's fake defines ------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def authorized(self, request: web.Request) -> bool:
        raise NotImplementedError

    def error(self, status: int, retry_after: float | str | None = None, message: str | None = None,
              param: str | None = None) -> web.Response:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------

    @staticmethod
    def retry_after_header(retry_after: float | str | None) -> dict[str, str]:
        if isinstance(retry_after, str):
            return {"Retry-After": retry_after}
        return {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}

    async def admit(self, request: web.Request) -> Admission:
        self.calls += 1
        files: dict[str, list[ReceivedFile]] = {}
        if request.content_type.startswith("multipart/"):
            body: dict[str, Any] = {}
            post = await request.post()
            for name, value in post.items():
                if isinstance(value, web.FileField):
                    files.setdefault(name, []).append(ReceivedFile(value.filename, value.content_type,
                                                                   value.file.read()))
                else:
                    body[name] = value
        else:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return Admission({}, {}, self.error(400, message="We could not parse the JSON body of your request."))
            if not isinstance(body, dict):
                return Admission({}, {}, self.error(400, message="The body must be a JSON object."))
        received = ReceivedRequest(request.path, dict(request.query), dict(request.headers), body, files,
                                   time.monotonic())
        self.requests.append(received)
        if self.on_request is not None:
            self.on_request(received)
        directives = (body.get("x_fake") or {}) if self.accepts_directives else {}
        latency = float(directives.get("latency", self.latency))
        if latency:
            await asyncio.sleep(latency)
        await self._answering.wait()
        if not self.authorized(request):
            return Admission(body, files, self.error(401))
        if self.fail_next:
            status, retry_after = self.fail_next.pop(0)
            return Admission(body, files, self.error(status, retry_after))
        if self.garbage_next:
            self.garbage_next -= 1
            page = "<html><body><h1>200 OK</h1>upstream connection reset</body></html>"
            return Admission(body, files, web.Response(status=200, text=page, content_type="text/html"))
        if "status" in directives:
            return Admission(body, files, self.error(int(directives["status"]), directives.get("retry_after")))
        return Admission(body, files)

    accepts_directives = False
