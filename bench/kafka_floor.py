"""The Kafka trips of a job alone, without Ferry: their latency and CPU a job, the floor under Ferry's.

    python -m bench.kafka_floor --bootstrap 127.0.0.1:19092 --rate 200 --seconds 15 --out FILE

Each job makes the Kafka trips a Ferry job makes, in the same order, with the same clients'
settings, and nothing else (no HTTP, no Faust, no validation, no provider):

1. the API's producer writes a ``pending`` record to a changelog topic and, once acknowledged,
   the request record to a request topic (a submit's two awaited writes, ``api/publisher.py``);
2. a worker's consumer reads the request, and a second producer writes the outcome record to the
   changelog, awaited (the worker's table write; a quiet start writes nothing before it);
3. a read model's consumer, reading every changelog partition, sees the outcome.

The consumers use fetch sessions as Ferry's do (``app/fetch_sessions.py``), and Ferry's long-poll
waits. Every client shares this one process and its loop, where Ferry's sit in two, so its CPU
is a lower bound. What it reports is what the durable design's trips cost on the box before
Ferry does any work of its own: the trip's stages, the process's CPU a job, and the broker's
when its pid is given. Figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from api.read_model import FETCH_MAX_WAIT_MS as READER_FETCH_MAX_WAIT_MS
from app.fetch_sessions import use_fetch_sessions
from app.kafka_clients import client_options
from app.logs import configure_logging
from app.runtime import use_uvloop
from app.settings import Settings
from app.topics import partition_for
from bench.stack import Sampler, percentile
from workers.faust_layer.consumer import FETCH_MAX_WAIT_MS as WORKER_FETCH_MAX_WAIT_MS

# Record sizes of a small chat job as Ferry writes them: its pending state, its request, its outcome.
PENDING = b"p" * 160
REQUEST = b"r" * 1100
OUTCOME = b"o" * 1500
JOB_TIMEOUT_SECONDS = 30.0
STAGES = ("pending_acked", "request_acked", "request_read", "outcome_acked", "outcome_read")


@dataclass
class Trip:
    """When each stage of one job's trip was reached, in seconds from its start."""

    began: float
    stages: dict[str, float] = field(default_factory=dict)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def reached(self, stage: str) -> None:
        self.stages[stage] = time.perf_counter() - self.began


def producer(settings: Settings) -> AIOKafkaProducer:
    """A producer with the API's settings (``api/publisher.py``): acknowledged by all, idempotent, no linger."""
    return AIOKafkaProducer(**client_options(settings), acks="all", enable_idempotence=True, linger_ms=0,
                            max_batch_size=256 * 1024)


def consumer(settings: Settings, fetch_max_wait_ms: int) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False,
                            fetch_max_wait_ms=fetch_max_wait_ms, max_partition_fetch_bytes=4 * 1024 * 1024)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(bootstrap: str, rate: float, seconds: float, partitions: int = 8,
                  broker_pid: int | None = None, warmup_seconds: float = 5.0) -> dict:
    """Offer ``rate`` jobs a second for ``seconds`` (open loop) and report their trips."""
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    name = f"floor-{uuid.uuid4().hex[:8]}"
    changelog, requests = f"{name}-changelog", f"{name}-requests"
    # Replicated as Ferry's topics would be on these brokers (bench/stack.py does the same).
    replicas = min(3, len(bootstrap.split(",")))
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(changelog, partitions, replicas, topic_configs={"cleanup.policy": "compact"}),
            NewTopic(requests, partitions, replicas)])
        try:
            return await _run(settings, changelog, requests, partitions, rate, seconds, broker_pid, warmup_seconds)
        finally:
            await admin.delete_topics([changelog, requests])
    finally:
        await admin.close()


async def _run(settings: Settings, changelog: str, requests: str, partitions: int, rate: float, seconds: float,
               broker_pid: int | None, warmup_seconds: float) -> dict:
    api_producer, worker_producer = producer(settings), producer(settings)
    worker = consumer(settings, WORKER_FETCH_MAX_WAIT_MS)
    reader = consumer(settings, READER_FETCH_MAX_WAIT_MS)
    trips: dict[bytes, Trip] = {}
    writes: set[asyncio.Task[None]] = set()
    clients = (api_producer, worker_producer, worker, reader)
    for client in clients:
        await client.start()
    try:
        for each, topic in ((worker, requests), (reader, changelog)):
            await use_fetch_sessions(each)
            assigned = [TopicPartition(topic, p) for p in range(partitions)]
            each.assign(assigned)
            await each.seek_to_end(*assigned)

        async def write_outcome(key: bytes, partition: int) -> None:
            await (await worker_producer.send(changelog, OUTCOME, key=key, partition=partition))
            trip = trips.get(key)  # None: a warm-up job, its trip cleared after the outcome was read
            if trip is not None:
                trip.reached("outcome_acked")

        async def work() -> None:
            while True:
                for records in (await worker.getmany(timeout_ms=1000)).values():
                    for record in records:
                        trip = trips.get(record.key)
                        if trip is not None:
                            trip.reached("request_read")
                        task = asyncio.create_task(write_outcome(record.key, record.partition))
                        writes.add(task)
                        task.add_done_callback(writes.discard)

        async def read() -> None:
            while True:
                for records in (await reader.getmany(timeout_ms=500, max_records=5000)).values():
                    for record in records:
                        trip = trips.get(record.key)
                        if record.value == OUTCOME and trip is not None and not trip.done.done():
                            trip.reached("outcome_read")
                            trip.done.set_result(None)

        async def job() -> bool:
            key = uuid.uuid4().hex.encode()
            partition = partition_for(key.decode(), partitions)
            trip = trips[key] = Trip(time.perf_counter())
            await (await api_producer.send(changelog, PENDING, key=key, partition=partition))
            trip.reached("pending_acked")
            await (await api_producer.send(requests, REQUEST, key=key, partition=partition))
            trip.reached("request_acked")
            try:
                await asyncio.wait_for(asyncio.shield(trip.done), JOB_TIMEOUT_SECONDS)
                return True
            except TimeoutError:
                return False

        async def offer(jobs_per_second: float, for_seconds: float) -> tuple[int, float]:
            """Open loop: start times follow the rate, whatever the trips take."""
            began = time.perf_counter()
            jobs = []
            for number in range(int(jobs_per_second * for_seconds)):
                delay = began + number / jobs_per_second - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                jobs.append(asyncio.create_task(job()))
            return sum(await asyncio.gather(*jobs)), time.perf_counter() - began

        loops = [asyncio.create_task(work()), asyncio.create_task(read())]
        await offer(rate, warmup_seconds)  # connections made, the broker's code for these requests compiled
        trips.clear()
        cpu_before = own_cpu()
        broker_before = Sampler.read(broker_pid)[1] if broker_pid else None
        completed, wall = await offer(rate, seconds)
        cpu = own_cpu() - cpu_before
        broker_cpu = Sampler.read(broker_pid)[1] - broker_before if broker_pid and broker_before is not None else None
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    finally:
        for client in clients:
            await client.stop()
    return summarize(trips, rate, completed, wall, cpu, broker_cpu)


def summarize(trips: dict[bytes, Trip], rate: float, completed: int, wall: float, cpu: float,
              broker_cpu: float | None) -> dict:
    finished = [trip.stages for trip in trips.values() if "outcome_read" in trip.stages]
    totals = [stages["outcome_read"] * 1000 for stages in finished]

    def median_from_start(stage: str) -> float | None:
        reached = [stages[stage] * 1000 for stages in finished if stage in stages]
        return round(statistics.median(reached), 3) if reached else None

    return {
        "offered_per_second": rate, "jobs": len(trips), "completed": completed,
        "p50_ms": percentile(totals, 0.50), "p99_ms": percentile(totals, 0.99),
        # Each stage's median time from the job's start (a record may be read before its write's
        # acknowledgement reaches the writer: the stages are not a sum).
        "median_ms_from_start": {stage: median_from_start(stage) for stage in STAGES},
        "clients_cpu_ms_per_job": round(1000 * cpu / max(1, completed), 3),
        "broker_cpu_ms_per_job": round(1000 * broker_cpu / max(1, completed), 3) if broker_cpu is not None else None,
        "wall_seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="load offered before the measured one")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--broker-pid", type=int, help="the broker's pid, for its CPU a job")
    parser.add_argument("--out", help="also write the figures here (JSON)")
    args = parser.parse_args()
    use_uvloop()  # Ferry's processes run on uvloop
    # Ferry's filters: aiokafka's complaints about the new topics' partitions not led yet are transient.
    configure_logging(Settings(log_level="WARNING"))
    try:
        figures = asyncio.run(measure(args.bootstrap, args.rate, args.seconds, args.partitions, args.broker_pid,
                                      args.warmup_seconds))
    except KafkaError as exc:
        raise SystemExit(f"python -m bench.kafka_floor: Kafka at {args.bootstrap} failed: {exc}") from None
    text = json.dumps(figures, indent=1)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    print(text)


if __name__ == "__main__":
    main()
