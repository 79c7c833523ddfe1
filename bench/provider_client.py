"""CPU per provider call: the worker's provider client (aiohttp) against httpx, same calls, one run.

    python -m bench.provider_client [--calls 5000] [--concurrency 100 10000] [--rounds 3]

The fake OpenAI provider (``bench.recording_fake``, no latency) runs in its own process; this
process sends ``--calls`` chat completions at each concurrency, with each client in turn, for
``--rounds`` rounds, and reports this process's CPU seconds per call (user + system), median
over the rounds. aiohttp is measured through ``workers.caller`` (``new_session`` and ``send``, as
the worker calls); httpx as the worker called it until 2026-12-02 (pools of 25 connections used
in turn, body and answer read whole). With concurrency over the connection limit (4096), calls
wait for a connection in both clients alike.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import httpx
import orjson

from app.settings import Settings
from bench.stack import wait_port
from deploy.processes import REPO_ROOT, free_port
from workers.caller import new_session, send
from workers.providers.base import HttpRequest, HttpResponse

HTTPX_POOL = 25  # connections per httpx client, as the worker had them


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _request(url: str, number: int) -> HttpRequest:
    return HttpRequest("POST", url, {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"job-{number} hi"}]})


async def _timed(calls: int, concurrency: int, call) -> dict:
    slots = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        async with slots:
            response = await call(number)
            assert response.status == 200, response.status
            orjson.loads(response.body)

    began, cpu = time.monotonic(), _cpu()
    await asyncio.gather(*(one(number) for number in range(calls)))
    return {"wall_s": time.monotonic() - began, "cpu_s": _cpu() - cpu}


async def with_aiohttp(url: str, calls: int, concurrency: int) -> dict:
    session = new_session(Settings())
    try:
        return await _timed(calls, concurrency, lambda number: send(session, _request(url, number)))
    finally:
        await session.close()


async def with_httpx(url: str, calls: int, concurrency: int) -> dict:
    pools = math.ceil(Settings().http_max_connections / HTTPX_POOL)
    limits = httpx.Limits(max_connections=HTTPX_POOL, max_keepalive_connections=HTTPX_POOL, keepalive_expiry=30.0)
    tls = httpx.create_ssl_context()
    clients = [httpx.AsyncClient(limits=limits, timeout=600, verify=tls) for _ in range(pools)]
    turn = itertools.count()

    async def call(number: int) -> HttpResponse:
        request = _request(url, number)
        reply = await clients[next(turn) % pools].request(request.method, request.url, headers=request.headers,
                                                           json=request.json)
        return HttpResponse(reply.status_code, reply.headers, reply.content)

    try:
        return await _timed(calls, concurrency, call)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def _summary(measured: list[dict], calls: int) -> dict:
    per_call = [1000 * r["cpu_s"] / calls for r in measured]
    return {"cpu_ms_per_call_median": round(statistics.median(per_call), 3),
            "cpu_ms_per_call_each_round": [round(ms, 3) for ms in per_call],
            "calls_per_s_median": round(statistics.median(calls / r["wall_s"] for r in measured))}


async def run(calls: int, concurrencies: list[int], rounds: int) -> dict:
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "bench.recording_fake", "--port", str(port)], cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: dict = {}
    try:
        await wait_port(port)
        for concurrency in concurrencies:
            runs: dict[str, list[dict]] = {"aiohttp": [], "httpx": []}
            for _ in range(rounds):  # alternating, so that drift on the box falls on both alike
                runs["aiohttp"].append(await with_aiohttp(url, calls, concurrency))
                runs["httpx"].append(await with_httpx(url, calls, concurrency))
            results[f"concurrency_{concurrency}"] = {client: _summary(measured, calls)
                                                     for client, measured in runs.items()}
    finally:
        fake.terminate()
        fake.wait(10)
    return {"calls": calls, "rounds": rounds, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.calls, args.concurrency, args.rounds)), indent=1))


if __name__ == "__main__":
    main()
