"""Guards the API's HTTP connections: deadlines for headers, idle keep-alive and bodies, a cap on
open connections, and the contract's error shape for requests aiohttp's parser refuses.

aiohttp bounds none of these on its own: its keep-alive timer runs from a response's end until
the next request's headers are in (so one setting would mean both idle time and header time),
nothing bounds a body, and its 400s are plain text quoting the client's bytes. Each piece sits at
the one layer where it can see what it needs:

- ``body_deadline`` (a middleware, so it also runs under aiohttp's TestServer): a request body
  may take ``api_body_timeout_seconds`` plus one second per ``api_body_min_rate_bytes_per_second``
  bytes received; slower, the handler is cancelled and the answer is 408, closing the connection.
- ``GuardedRequestHandler`` (aiohttp's per-connection protocol): header and idle deadlines, the
  contract-shaped answer to a malformed request, and a broken chunked body failing the request
  that reads it instead of leaving it waiting.
- ``GuardedServer`` (aiohttp's protocol factory): at ``api_max_connections`` a new connection
  closes the one that has waited longest without a request in progress.
- ``serve`` runs an app with all of it (``python -m api`` and the tests).

aiohttp offers no public hook for the protocol class; what this module relies on of its
internals is listed in ``AIOHTTP_INTERNALS`` and checked by tests/api/test_connections.py.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import RawRequestMessage
from aiohttp.log import access_logger
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from api.errors import ApiError, body_timeout, headers_timeout, malformed_request, over_connection_limit
from app.settings import Settings

log = logging.getLogger(__name__)

# What of aiohttp's internals this module uses, for the test that fails when an upgrade moves them.
AIOHTTP_INTERNALS = (
    "web_protocol.RequestHandler.handle_error (overridden: the answer to a malformed request)",
    "web_protocol.RequestHandler.finish_response (overridden: a response has ended)",
    "web_protocol.RequestHandler._messages and web_protocol._ErrInfo (a parse error queued mid-body)",
    "web_server.Server._loop and Server._kwargs (building the guarded server and its protocols)",
    "web_runner.AppRunner._make_server (overridden: the guarded server in place of aiohttp's)",
)
# Looked up, not imported: an aiohttp without it only loses the prompt 400 for a bad chunk.
_PARSE_ERROR = getattr(web_protocol, "_ErrInfo", None)


def descriptors_reserved(open_file_limit: int) -> int:
    """Descriptors kept for all but client connections (Kafka sockets, the event loop's own, log
    files): an eighth of the limit, at least 64."""
    return max(64, open_file_limit // 8)


@dataclass(frozen=True)
class ConnectionLimits:
    """What the protocol layer enforces (the body's deadline is the ``body_deadline`` middleware's)."""

    header_timeout: float
    keepalive_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings, open_file_limit: int | None = None) -> ConnectionLimits:
        """The configured limits, the connection cap lowered to fit ``open_file_limit``."""
        cap = settings.api_max_connections
        if open_file_limit is not None:
            cap = max(1, min(cap, open_file_limit - descriptors_reserved(open_file_limit)))
        return cls(header_timeout=settings.api_header_timeout_seconds,
                   keepalive_timeout=settings.api_keepalive_timeout_seconds, max_connections=cap)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (every connection is a descriptor); return
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit for descriptors; 2^20 is its default ceiling (nr_open).
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def handler_args(settings: Settings) -> dict[str, Any]:
    """aiohttp's per-connection options for ``web.Application(handler_args=...)``."""
    return {
        # aiohttp's own keep-alive timer runs from a response's end until the next request's
        # headers are in; the guard's idle and header deadlines are tighter, so it is only a
        # backstop (and the bound under a server without the guard, like aiohttp's TestServer).
        "keepalive_timeout": settings.api_keepalive_timeout_seconds + settings.api_header_timeout_seconds,
        "access_log": access_logger if settings.api_access_log else None,
    }


def body_deadline(timeout: float, min_rate: int) -> Middleware:
    """Middleware: cut off a request whose body arrives slower than ``timeout`` seconds plus one
    second per ``min_rate`` bytes received (counted from when the handler starts)."""

    @web.middleware
    async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = request.content
        if body.is_eof():  # no body, or all of it already in
            return await handler(request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        cut_off = asyncio.timeout(None)
        check: asyncio.TimerHandle  # the next look at the body's rate; check_rate moves it on

        def check_rate() -> None:
            nonlocal check
            if body.is_eof():
                return  # the body is in: what the handler does next is not bounded here
            due = started + timeout + body.total_raw_bytes / min_rate
            if loop.time() >= due:
                cut_off.reschedule(loop.time())  # cancels the handler, mid-read
            else:
                check = loop.call_at(due, check_rate)

        check = loop.call_at(started + timeout, check_rate)
        try:
            async with cut_off:
                return await handler(request)
        except TimeoutError:
            if cut_off.expired():
                raise body_timeout(timeout, min_rate) from None
            raise
        finally:
            check.cancel()

    return deadline_middleware


class Phase(enum.Enum):
    HEADERS = "waiting for a request's headers"  # from the connection's opening or the request's first byte
    REQUEST = "a request in progress"  # from its headers until its response has been written
    IDLE = "idle"  # kept alive: from a response's end until the next request's first byte


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, with deadlines and contract-shaped protocol errors."""

    # Prefixed: RequestHandler has slots of its own, and a later aiohttp may add more.
    __slots__ = ("_guard_server", "_guard_limits", "_guard_phase", "_guard_phase_bytes", "_guard_deadline",
                 "_guard_body")

    def __init__(self, manager: GuardedServer, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard_server = manager
        self._guard_limits = limits
        self._guard_phase = Phase.HEADERS
        self._guard_phase_bytes = 0  # bytes received in this phase: has a request begun?
        self._guard_deadline: asyncio.TimerHandle | None = None
        self._guard_body: StreamReader | None = None  # the body of the request started last

    # -- the connection's phases -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._guard_server.admit(self):
            self._enter(Phase.HEADERS)
        else:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_deadline()
        self._guard_server.release(self)
        super().connection_lost(exc)
        body = self._guard_body
        if self._guard_phase is Phase.IDLE and body is not None and not body.is_eof():
            # aiohttp was draining the unread rest of an answered request's body, which will not
            # come now: end it, or the drain waits out its 10 s for nothing.
            body.feed_eof()

    def data_received(self, data: bytes) -> None:
        # Bytes while idle begin the next request, unless they are the rest of an unread body
        # that aiohttp drains after the previous response.
        body = self._guard_body
        if data and self._guard_phase is Phase.IDLE and (body is None or body.is_eof()):
            self._enter(Phase.HEADERS)
        if self._guard_phase is Phase.HEADERS:
            self._guard_phase_bytes += len(data)
        super().data_received(data)
        if self._guard_phase is Phase.REQUEST:
            self._fail_body_on_parse_error()

    def request_started(self, body: StreamReader) -> None:
        """The next request's headers are in (called by the server's request factory)."""
        self._guard_body = body
        self._enter(Phase.REQUEST)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        body = request.content
        if body.exception() is not None and not body.is_eof():
            # A broken body cannot be drained: mark it ended, so that aiohttp closes the connection
            # after this answer instead of reading into the error and logging it as unhandled.
            body.feed_eof()
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self.transport is not None:
                self._enter(Phase.IDLE)

    def _enter(self, phase: Phase) -> None:
        self._guard_phase = phase
        self._guard_phase_bytes = 0
        self._cancel_deadline()
        if phase is Phase.REQUEST:
            self._guard_server.busy(self)  # its body's deadline is body_deadline's
            return
        self._guard_server.waiting(self)
        limits = self._guard_limits
        seconds = limits.header_timeout if phase is Phase.HEADERS else limits.keepalive_timeout
        self._guard_deadline = asyncio.get_running_loop().call_later(seconds, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._guard_deadline is not None:
            self._guard_deadline.cancel()
            self._guard_deadline = None

    def _on_deadline(self) -> None:
        self._guard_deadline = None
        if self._guard_phase is Phase.HEADERS:
            seconds = self._guard_limits.header_timeout
            log.debug("closing a connection from %s: no complete request headers within %g s", self.peername, seconds)
            self._close_with(headers_timeout(seconds) if self._guard_phase_bytes else None)
        elif self._guard_phase is Phase.IDLE:
            self._close_with(None)

    def evict(self) -> None:
        """Close to make room for a new connection (this one is idle or still sending headers)."""
        log.debug("closing a connection from %s (%s) to make room for a new one", self.peername,
                  self._guard_phase.value)
        began_request = self._guard_phase is Phase.HEADERS and self._guard_phase_bytes > 0
        self._close_with(over_connection_limit() if began_request else None)

    def _close_with(self, answer: ApiError | None) -> None:
        """Close now, first writing ``answer`` (for a client that has begun a request)."""
        self._cancel_deadline()
        self._guard_server.release(self)
        if answer is not None and self.transport is not None:
            self.transport.write(answer.to_http_bytes())  # the transport sends it before closing
        self.force_close()

    # -- malformed requests ----------------------------------------------------------------------

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (and to an exception escaping the
        app, which error_middleware prevents): the contract's error object, not plain text."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            reason = "internal server error" if status == 500 else HTTPStatus(status).phrase.lower()
            error = ApiError(status, reason, error_type="internal_error", close_connection=True)
        else:
            error = malformed_request(exc, status)
            # The client's mistake, not the server's: one line, no traceback, none of its bytes.
            # Anything that is not HTTP at all (scanners, TLS on the plain port) only at DEBUG.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            log.log(level, "refused a malformed request from %s: %s", request.remote, error.message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; the error cannot be answered")
        return error.to_response()

    def _fail_body_on_parse_error(self) -> None:
        """Fail the body being read when the parser refused what came after its headers.

        aiohttp's C parser drops the body on a parse error (a bad chunk size) and queues a 400
        for after the current request, which meanwhile waits for the rest of its body until
        body_deadline cuts it off. Its pure-Python parser fails the body itself, as this does.
        """
        body = self._guard_body
        if _PARSE_ERROR is None or body is None or body.is_eof() or body.exception() is not None:
            return
        for message, _ in getattr(self, "_messages", ()):
            if isinstance(message, _PARSE_ERROR):
                body.set_exception(message.exc)
                return


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making ``GuardedRequestHandler``s and keeping at most
    ``max_connections`` of them open."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._open_connections: set[GuardedRequestHandler] = set()
        # Connections without a request in progress, the one waiting longest first.
        self._waiting_connections: OrderedDict[GuardedRequestHandler, None] = OrderedDict()
        self._evicted = self._refused = 0
        self._last_warning = float("-inf")
        make_request = self.request_factory

        def make_request_noting_start(message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
                                      writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
            if isinstance(protocol, GuardedRequestHandler):
                protocol.request_started(payload)
            return make_request(message, payload, protocol, writer, task)

        self.request_factory = make_request_noting_start

    @classmethod
    def replacing(cls, server: web.Server, limits: ConnectionLimits) -> GuardedServer:
        """The guarded twin of ``server``, which aiohttp built with the app's handler and options."""
        return cls(server.request_handler, request_factory=server.request_factory,
                   handler_cancellation=server.handler_cancellation, loop=server._loop, limits=limits,
                   **server._kwargs)

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self._limits, **self._kwargs)

    def admit(self, connection: GuardedRequestHandler) -> bool:
        """Make room for a new connection by closing the one waiting longest; False if every
        open connection has a request in progress (the new one is then refused)."""
        while len(self._open_connections) >= self._limits.max_connections:
            if not self._waiting_connections:
                self._refused += 1
                self._warn_at_cap()
                return False
            self._evicted += 1
            next(iter(self._waiting_connections)).evict()  # evict() releases it
            self._warn_at_cap()
        self._open_connections.add(connection)
        return True

    def waiting(self, connection: GuardedRequestHandler) -> None:
        if connection in self._open_connections:
            self._waiting_connections[connection] = None
            self._waiting_connections.move_to_end(connection)

    def busy(self, connection: GuardedRequestHandler) -> None:
        self._waiting_connections.pop(connection, None)

    def release(self, connection: GuardedRequestHandler) -> None:
        self._open_connections.discard(connection)
        self._waiting_connections.pop(connection, None)

    def _warn_at_cap(self) -> None:
        now = self._loop.time()
        if now - self._last_warning >= 60:
            log.warning("at the connection cap (%d): closed %d idle or slow connection(s) and refused %d new "
                        "one(s) since the last warning", self._limits.max_connections, self._evicted, self._refused)
            self._last_warning = now
            self._evicted = self._refused = 0


class GuardedAppRunner(web.AppRunner):
    """aiohttp's AppRunner (app start-up, graceful shutdown) serving through a ``GuardedServer``."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer.replacing(await super()._make_server(), self._limits)


async def serve(app: web.Application, limits: ConnectionLimits, host: str, port: int, *,
                backlog: int = 128) -> tuple[GuardedAppRunner, int]:
    """Start ``app`` with the guard on ``host:port`` (0: any free port); the runner (stop it
    with ``cleanup()``) and the port bound."""
    runner = GuardedAppRunner(app, limits)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site.port
