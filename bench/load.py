"""The benchmarks' load generator: one process of its own, so that its CPU is not Ferry's.

    python -m bench.load submit --url URL --path PATH --concurrency 64 --seconds 10 --out FILE
    python -m bench.load e2e    --url URL --rate 200 --seconds 10 --out FILE
    python -m bench.load poll   --url URL --ids-file IDS --concurrency 64 --seconds 10 --out FILE
    python -m bench.load kafka  --bootstrap HOST:PORT --topic T --concurrency 64 --seconds 10 --out FILE

Every HTTP mode takes ``--model`` and ``--header "Name: value"`` (repeatable) for another gateway;
``e2e`` takes ``--max-wait S``: a job still waiting after S seconds is recorded with status 1.

``submit``: closed loop, each client POSTs a 1 KB chat job and waits for the answer.
``e2e``: open loop at a fixed offered rate; each job is submitted, then polled until it answers
200 (every 5 ms for its first 100 ms, then less often: ``poll_interval``); the latency is submit
to terminal. ``poll``: closed-loop GETs of known ids.
``kafka``: the submit ceiling without Ferry: 1 KB records sent with the API's producer settings
(acks=all, idempotent, no linger), each awaited like a submit.

Every mode writes JSON: per-request ``[start_offset_s, latency_ms, status]``, and the
generator's own CPU seconds and wall seconds (to show it was not the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid

import aiohttp

from app.runtime import use_uvloop

CHAT = "/v1/async/chat/completions"


def chat_body(model: str) -> dict:
    """A chat job of about 1 KB of JSON."""
    return {"model": model, "messages": [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "x" * 900}], "temperature": 0.0}


def poll_interval(waited: float) -> float:
    """5 ms polls for the first 100 ms, 20 ms up to a second, 100 ms up to 3 s, then 5 % of the
    time waited: precise where the targets are (a precision of about 5 % throughout), without
    thousands of jobs in flight turning into a flood of polls that starves the API and worker."""
    return 0.005 if waited < 0.1 else 0.02 if waited < 1.0 else 0.1 if waited < 3.0 else 0.05 * waited


def header(text: str) -> tuple[str, str]:
    """An argparse type: ``"Name: value"``, a header another gateway may need (its key, say)."""
    name, colon, value = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f'{text!r} is not "Name: value"')
    return name.strip(), value.strip()


def headers(args) -> dict[str, str]:
    """The ``--header`` options, as a session's headers."""
    return dict(args.header)


class Recorder:
    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.samples: list[tuple[float, float, int]] = []
        self.connection_errors = 0  # polls sent again on a new connection
        self.polls = 0  # e2e: GETs sent, answered or not (the API's work grows with the latency)

    def add(self, started: float, status: int) -> None:
        now = time.perf_counter()
        self.samples.append((round(started - self.began, 4), round((now - started) * 1000, 3), status))


async def closed_loop(seconds: float, concurrency: int, one_request) -> Recorder:
    recorder = Recorder()
    deadline = recorder.began + seconds

    async def client(number: int) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status = await one_request(number)
            recorder.add(started, status)

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    return recorder


async def submit(args) -> Recorder:
    raw = json.dumps(chat_body(args.model)).encode()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(args.url, connector=connector, headers=headers(args)) as session:
        async def one(_: int) -> int:
            async with session.post(args.path, data=raw, headers={"Content-Type": "application/json"}) as reply:
                await reply.read()
                return reply.status

        return await closed_loop(args.seconds, args.concurrency, one)


# Connections the open-loop client keeps at most: a pool as a real client has, well under the API's
# connection cap (4,096), where it closes idle connections and a pooled one can die under a request.
E2E_CONNECTIONS = 1024
CONNECTION_FAILED = 0  # the status recorded for a submit whose connection failed
NOT_DONE_IN_TIME = 1  # the status recorded for a job still waiting after --max-wait seconds


async def e2e(args) -> Recorder:
    raw = json.dumps(chat_body(args.model)).encode()
    recorder = Recorder()
    connector = aiohttp.TCPConnector(limit=E2E_CONNECTIONS)
    async with aiohttp.ClientSession(args.url, connector=connector, headers=headers(args)) as session:
        async def job() -> None:
            started = time.perf_counter()
            try:
                async with session.post(CHAT, data=raw, headers={"Content-Type": "application/json"}) as reply:
                    body = await reply.json()
                    if reply.status != 202:
                        recorder.add(started, reply.status)
                        return
            except aiohttp.ClientConnectionError:
                recorder.add(started, CONNECTION_FAILED)  # not sent again: a POST may have been taken
                return
            while True:
                if args.max_wait and time.perf_counter() - started > args.max_wait:
                    recorder.add(started, NOT_DONE_IN_TIME)
                    return
                recorder.polls += 1
                try:
                    async with session.get(f"{CHAT}/{body['id']}") as reply:
                        await reply.read()
                        if reply.status != 202:
                            recorder.add(started, reply.status)
                            return
                except aiohttp.ClientConnectionError:
                    # A pooled connection the server closed (at its connection cap it closes idle
                    # ones): a client polls again, as this one does; counted in the output.
                    recorder.connection_errors += 1
                    continue
                await asyncio.sleep(poll_interval(time.perf_counter() - started))

        tasks = []
        total = int(args.rate * args.seconds)
        for number in range(total):
            # Open loop: start times follow the offered rate, whatever the answers do.
            delay = recorder.began + number / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(job()))
        await asyncio.gather(*tasks)
    return recorder


async def poll(args) -> Recorder:
    with open(args.ids_file) as ids_file:
        ids = json.load(ids_file)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(args.url, connector=connector, headers=headers(args)) as session:
        polls = 0

        async def one(number: int) -> int:
            nonlocal polls
            polls += 1
            async with session.get(f"{CHAT}/{ids[(number * 7919 + polls) % len(ids)]}") as reply:
                await reply.read()
                return reply.status

        return await closed_loop(args.seconds, args.concurrency, one)


async def kafka(args) -> Recorder:
    from aiokafka import AIOKafkaProducer

    from app.kafka_clients import client_options
    from app.settings import Settings

    # The broker's security settings (FERRY_KAFKA_SECURITY_PROTOCOL...) as Ferry's processes take them.
    security = client_options(Settings(kafka_bootstrap_servers=args.bootstrap))
    producer = AIOKafkaProducer(**security, acks="all", enable_idempotence=True,
                                linger_ms=0, max_batch_size=256 * 1024)
    await producer.start()
    value = json.dumps(chat_body(args.model)).encode()
    try:
        async def one(_: int) -> int:
            await producer.send_and_wait(args.topic, value, key=uuid.uuid4().hex.encode())
            return 202

        return await closed_loop(args.seconds, args.concurrency, one)
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["submit", "e2e", "poll", "kafka"])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--path", default=CHAT)
    parser.add_argument("--model", default="fake/gpt-4o-mini")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--ids-file")
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--max-wait", type=float, help="e2e: seconds after which a job still waiting is "
                        "recorded as not done (status 1) and no longer polled")
    parser.add_argument("--header", type=header, action="append", default=[],
                        help='"Name: value", sent with every request')
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    use_uvloop()  # less CPU per request: the generator must not be what limits a figure
    recorder = asyncio.run(globals()[args.mode](args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(args.out, "w") as out:
        json.dump({"mode": args.mode, "wall_seconds": round(time.perf_counter() - recorder.began, 3),
                   "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3), "samples": recorder.samples,
                   "connection_errors": recorder.connection_errors, "polls": recorder.polls}, out)


if __name__ == "__main__":
    main()
