"""The connection guard (api/connections.py) on a real server: slow headers, slow bodies, idle
keep-alive, the connection cap, client hang-ups and the access log, with raw sockets as clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import aiohttp
import pytest

from api import connections
from api.connections import AIOHTTP_INTERNALS, ConnectionLimits
from app.settings import Settings
from deploy.processes import FerryProcess, free_port
from tests.helpers import (
    CHAT,
    CUT_OFF_WITHIN,
    assert_contract_error,
    closed_by_server,
    guarded_api,
    read_response,
    wait_until,
)


async def health(port: int) -> int:
    """A normal client's health check, on a connection of its own."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/health/live",
                               timeout=aiohttp.ClientTimeout(total=CUT_OFF_WITHIN)) as response:
            return response.status


async def trickle(writer: asyncio.StreamWriter, chunk: bytes, every: float) -> None:
    """Send ``chunk`` every ``every`` seconds until the server closes the connection."""
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(every)


async def test_slow_headers_are_cut_off_while_other_clients_are_served(settings) -> None:
    async with guarded_api(settings, api_header_timeout_seconds=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\n".encode())
        slowloris = asyncio.create_task(trickle(writer, b"X-Slow: 1\r\n", every=0.2))  # never ends its headers
        assert await health(port) == 200
        status, headers, body = await read_response(reader)
        assert status == 408 and headers["connection"] == "close"
        assert_contract_error(body, 408)
        assert await closed_by_server(reader) == b""
        await slowloris
        writer.close()


async def test_slow_headers_on_a_kept_alive_connection_are_cut_off(settings) -> None:
    async with guarded_api(settings, api_header_timeout_seconds=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: ferry\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /health/live HTTP/1.1\r\n")
        slowloris = asyncio.create_task(trickle(writer, b"X-Slow: 1\r\n", every=0.2))
        status, _, body = await read_response(reader)
        assert status == 408
        assert_contract_error(body, 408)
        assert await closed_by_server(reader) == b""
        await slowloris
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed(settings) -> None:
    async with guarded_api(settings, api_keepalive_timeout_seconds=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: ferry\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await closed_by_server(reader) == b""  # quietly: no 408 to a client that sent nothing
        writer.close()


async def test_a_byte_a_second_body_is_answered_408_and_cut_off(settings) -> None:
    async with guarded_api(settings, api_body_timeout_seconds=1, api_body_min_rate_bytes_per_second=1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n".encode())
        slow_body = asyncio.create_task(trickle(writer, b" ", every=1))
        assert await health(port) == 200
        status, headers, body = await read_response(reader)
        assert status == 408 and headers["connection"] == "close"
        assert "too slow" in assert_contract_error(body, 408)["error"]["message"]
        assert await closed_by_server(reader) == b""
        await slow_body
        writer.close()


async def test_an_oversized_body_sent_slowly_gets_its_413_at_once(settings) -> None:
    # Content-Length says it is too big: the answer must not wait for the body (nor its deadline).
    async with guarded_api(settings, api_body_timeout_seconds=300) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {settings.max_request_bytes + 1}\r\n\r\n".encode())
        slow_body = asyncio.create_task(trickle(writer, b" " * 64, every=0.1))
        status, headers, body = await read_response(reader)
        assert status == 413 and headers["connection"] == "close"
        assert_contract_error(body, 413)
        slow_body.cancel()
        writer.close()


async def test_at_the_connection_cap_the_longest_waiting_connections_make_room(settings) -> None:
    async with guarded_api(settings, api_max_connections=20, api_header_timeout_seconds=120) as port:
        opened = []
        for _ in range(10):  # kept alive after one request each: idle, oldest first
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: ferry\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            opened.append((reader, writer))
        for _ in range(10):  # silent since connecting
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        for _ in range(5):  # still sending headers
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: ferry\r\n")
            opened.append((reader, writer))
        assert await health(port) == 200  # the 26th connection

        # Six made room (five over the cap, then the probe's): the six idle the longest.
        for reader, _ in opened[:6]:
            assert await closed_by_server(reader) == b""
        newest_reader, newest_writer = opened[-1]
        newest_writer.write(b"\r\n")  # ends its headers: it was kept
        assert (await read_response(newest_reader))[0] == 200
        for _, writer in opened:
            writer.close()


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(settings) -> None:
    async with guarded_api(settings, api_max_connections=3, api_body_timeout_seconds=120) as port:
        busy = []
        for _ in range(3):  # each one's request is being handled, its body still arriving
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CUT_OFF_WITHIN)).startswith(
                b"HTTP/1.1 100")
            busy.append((reader, writer))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(reader) == b""
        writer.close()
        for _, writer in busy:
            writer.close()


async def test_a_client_hanging_up_mid_body_is_not_a_server_error(settings, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with guarded_api(settings) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode())
        # 100 Continue: the handler has started and is about to read the body.
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CUT_OFF_WITHIN)).startswith(b"HTTP/1.1 100")
        writer.write(b'{"model": "openai/gpt-4o-mini", "mess')
        await writer.drain()
        writer.close()
        await wait_until(lambda: any(record.name == "api.errors" for record in caplog.records), CUT_OFF_WITHIN,
                         "the API to notice the hang-up")
        assert await health(port) == 200
    served = [record for record in caplog.records if record.name.split(".")[0] in ("api", "aiohttp")]
    assert [record.getMessage() for record in served if record.levelno >= logging.ERROR] == []
    assert [record.getMessage() for record in served if record.exc_info] == []
    assert any("client closed the connection" in record.getMessage() for record in served)


@pytest.mark.parametrize("enabled", [False, True])
async def test_the_access_log_is_off_unless_asked_for(settings, caplog, enabled) -> None:
    caplog.set_level(logging.INFO)
    async with guarded_api(settings, api_access_log=enabled) as port:
        assert await health(port) == 200
    access = [record for record in caplog.records if record.name == "aiohttp.access"]
    assert len(access) == (1 if enabled else 0)


def test_the_connection_cap_fits_the_open_file_limit() -> None:
    settings = Settings(api_max_connections=4096)
    assert ConnectionLimits.from_settings(settings).max_connections == 4096
    assert ConnectionLimits.from_settings(settings, open_file_limit=256).max_connections == 256 - 64
    assert ConnectionLimits.from_settings(settings, open_file_limit=1 << 20).max_connections == 4096


def test_the_aiohttp_internals_the_guard_relies_on_are_there() -> None:
    """Fails when an aiohttp upgrade moves what api/connections.py overrides or reads."""
    from aiohttp import web_protocol, web_runner, web_server
    assert len(AIOHTTP_INTERNALS) == 5
    for cls, name in [(web_protocol.RequestHandler, "handle_error"), (web_protocol.RequestHandler, "finish_response"),
                      (web_runner.AppRunner, "_make_server")]:
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name} is gone"
    assert "_messages" in web_protocol.RequestHandler.__slots__
    assert connections._PARSE_ERROR is web_protocol._ErrInfo
    assert {"status", "exc", "message"} <= {field.name for field in web_protocol._ErrInfo.__attrs_attrs__}
    server = web_server.Server(lambda request: None, loop=asyncio.new_event_loop(), keepalive_timeout=5)
    try:
        assert server._kwargs == {"keepalive_timeout": 5} and server._loop is not None
    finally:
        server._loop.close()


@pytest.mark.timeout(120)
async def test_python_m_api_serves_with_the_guard_and_stops_on_sigterm(settings, tmp_path) -> None:
    port = free_port()
    process = FerryProcess("api", settings, tmp_path / "api", FERRY_API_PORT=str(port),
                           FERRY_API_HEADER_TIMEOUT_SECONDS="1").start()
    try:
        async def live() -> bool:
            try:
                return await health(port) == 200
            except aiohttp.ClientError:
                return False

        await wait_until(live, 60, "python -m api to answer", interval=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health/live HTTP/1.1\r\n")  # and nothing more
        assert (await read_response(reader))[0] == 408
        writer.close()
        process.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.process.wait, 60) == 0
    finally:
        process.kill()
