"""Submit-to-completed time of single jobs, one at a time, against a running Ferry, hop by hop.

    python -m bench.one_job_latency [--url http://127.0.0.1:8080] [--jobs 100] [--model fake/gpt-4o-mini]
                                    [--breakdown]

Each job is submitted, then polled every millisecond until it answers 200; the figure is the
time from sending the POST to reading the 200 (so it includes up to ~1 ms of poll spacing).

``--breakdown`` then reads the jobs' records back from Kafka (the settings' bootstrap servers and
topics, as the API and worker read them) and splits each trip at the records' create times, which
the producers stamp in milliseconds as they send: the API's ``pending`` and request records, the
worker's outcome record. Every process is on this box, so one clock serves.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from aiokafka import AIOKafkaConsumer

from app.jobs import JobState, JobStatus, RequestType
from app.kafka_clients import client_options
from app.settings import Settings
from app.topics import changelog_topic, request_topic

# The hops of one trip, each from the first moment to the second (ms since the epoch).
HOPS = (
    ("submit sent -> pending record", "sent", "pending"),
    ("pending -> request record (the pending write acknowledged)", "pending", "request"),
    ("request record -> 202 read", "request", "accepted"),
    # A fast call starts quietly (workers/quiet_starts.py): its outcome is the worker's first record.
    ("request record -> outcome record (fetch, hand-over, agent, provider call)", "request", "completed"),
    ("outcome record -> 200 read (write acknowledged, read model, poll)", "completed", "seen"),
)

Trip = dict[str, float]  # a job's moments, by name (as in HOPS), in ms since the epoch


async def run(url: str, jobs: int, model: str) -> dict[str, Trip]:
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}]}
    trips: dict[str, Trip] = {}
    async with aiohttp.ClientSession(base_url=url) as session:
        for _ in range(jobs):
            trip: Trip = {"sent": time.time() * 1000}
            async with session.post("/v1/async/chat/completions", json=body) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            trip["accepted"] = time.time() * 1000
            while True:
                async with session.get(f"/v1/async/chat/completions/{job_id}") as response:
                    if response.status == 200:
                        assert (await response.json())["status"] == "completed"
                        break
                await asyncio.sleep(0.001)
            trip["seen"] = time.time() * 1000
            trips[job_id] = trip
    return trips


async def add_record_times(settings: Settings, trips: dict[str, Trip]) -> None:
    """Each job's record create times, read from the request topic and the changelog."""
    topics = [request_topic(settings, RequestType.chat_completion), changelog_topic(settings)]
    consumer = AIOKafkaConsumer(*topics, **client_options(settings), auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        idle_rounds = 0
        while idle_rounds < 3:  # the topics read to their end
            batches = await consumer.getmany(timeout_ms=1000)
            idle_rounds = 0 if batches else idle_rounds + 1
            for tp, records in batches.items():
                for record in records:
                    job_id = record.key.decode() if record.key else None
                    if job_id not in trips or record.value is None:
                        continue
                    moments = trips[job_id]
                    if tp.topic == topics[0]:
                        moments.setdefault("request", record.timestamp)
                    else:
                        status = JobState.from_bytes(record.value).status
                        if status in (JobStatus.pending, JobStatus.completed):
                            moments.setdefault(status.value, record.timestamp)
    finally:
        await consumer.stop()


def summary(trips: dict[str, Trip]) -> list[str]:
    total = sorted(trip["seen"] - trip["sent"] for trip in trips.values())
    lines = [f"{len(total)} jobs, submit -> completed: median {statistics.median(total):.1f} ms, "
             f"p90 {total[int(len(total) * 0.9) - 1]:.1f} ms, min {total[0]:.1f} ms, max {total[-1]:.1f} ms"]
    for name, begin, end in HOPS:
        spans = sorted(trip[end] - trip[begin] for trip in trips.values() if begin in trip and end in trip)
        if spans:
            lines.append(f"  {name}: median {statistics.median(spans):.1f} ms, "
                         f"p90 {spans[int(len(spans) * 0.9) - 1]:.1f} ms ({len(spans)} jobs)")
    return lines


async def main_async(args: argparse.Namespace) -> list[str]:
    trips = await run(args.url, args.jobs, args.model)
    if args.breakdown:
        await add_record_times(Settings(), trips)
    return summary(trips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--model", default="fake/gpt-4o-mini")
    parser.add_argument("--breakdown", action="store_true",
                        help="split each trip at its Kafka records' create times (reads the settings' topics)")
    print("\n".join(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
