"""Requests aiohttp's HTTP parser refuses get the contract's error object (as raw bytes over a
socket, served the way ``python -m api`` serves), without echoing the request or logging an error."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.helpers import CHAT, CUT_OFF_WITHIN, assert_contract_error, closed_by_server, guarded_api, read_response

SECRET = "sk-bf-0123456789abcdef"

MALFORMED = {
    "request line": b"NOT AN HTTP REQUEST\r\n\r\n",
    "TLS on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "header line too long": (f"GET /health/live HTTP/1.1\r\nHost: ferry\r\nx-bf-vk: {SECRET}".encode()
                             + b"0" * 9000 + b"\r\n\r\n"),
    "invalid header bytes": f"GET /health/live HTTP/1.1\r\nHost: ferry\r\nX\x01{SECRET}: 1\r\n\r\n".encode(),
    "bad chunked encoding": (f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                             "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n").encode(),
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_gets_the_contract_error_object(settings, caplog, request_bytes) -> None:
    caplog.set_level(logging.DEBUG)
    async with guarded_api(settings) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        status, headers, body = await read_response(reader)
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert_contract_error(body, 400)
        assert await closed_by_server(reader) == b""
        writer.close()
    assert SECRET.encode() not in body
    served = [record for record in caplog.records if record.name.split(".")[0] in ("api", "aiohttp")]
    assert [record.getMessage() for record in served if record.levelno >= logging.WARNING or record.exc_info] == []
    assert all(SECRET not in record.getMessage() for record in served)


async def test_a_bad_chunk_after_the_headers_is_answered_400_at_once(settings) -> None:
    # The request is being handled (100 Continue) when its body turns out to be malformed.
    async with guarded_api(settings, api_body_timeout_seconds=300) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CUT_OFF_WITHIN)).startswith(b"HTTP/1.1 100")
        writer.write(b"2\r\n{}\r\nzz\r\n")
        status, headers, body = await read_response(reader)
        assert status == 400 and headers["connection"] == "close"
        assert assert_contract_error(body, 400)["error"]["message"].startswith("malformed")
        assert await closed_by_server(reader) == b""
        writer.close()
