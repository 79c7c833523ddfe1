"""Broker loss on the three-node cluster under a steady load: what the ``failover`` scenario
measures and the cluster chaos tests assert.

One run: the API and one worker as processes (``python -m api``, ``python -m workers``) on the
cluster, Ferry's topics at three replicas, the recording fake provider, and submits at a fixed
rate (open loop: a submit that waits does not hold back the next). While they run, one fault:

- ``leader``: SIGKILL the node that leads the most of Ferry's partitions, start it again later;
- ``controller``: the same for the active KRaft controller (a new one is elected before the
  dead node can be fenced);
- ``follower``: the same for a node that leads none of them (made so first: stopped with
  SIGTERM, whose controlled shutdown hands its leaderships over, and started again);
- ``rolling``: each node in turn stopped with SIGTERM and started again, the next one only once
  every replica is back in sync (as Strimzi rolls brokers).

The result says what every submit was answered and when, whether each accepted job ended, how
often the provider was called for each job (a refused job must never be), and the 503 window.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from app.settings import Settings
from app.topics import topic_specs
from bench.load import CHAT
from bench.stack import RecordingFake, Stack, marked_body, percentile, stack_settings, wait_port
from deploy.kafka.cluster import LocalKafkaCluster, PartitionState, partition_states
from deploy.processes import free_port

KINDS = ("leader", "follower", "controller", "rolling")
CONSUMER_OFFSETS = "__consumer_offsets"  # where the workers' group coordinator lives
# Bounds on waits for the cluster and the jobs: a run that passes one is reported as failed.
IN_SYNC_WITHIN = 120
DRAIN_WITHIN = 180


@dataclass
class BrokerFault:
    """One run's plan: the fault, the load around it, and its timing in seconds from the load's start."""

    kind: str = "leader"
    rate: int = 80  # submits a second
    seconds: float = 30  # of load at least; a rolling restart keeps it going until the last node is back
    fault_at: float = 6
    down_for: float = 10  # how long a killed node stays down
    provider_latency: float = 0.05


@dataclass
class Submitted:
    """One submit: when it was sent and answered (``time.monotonic()``), and the answer."""

    marker: str
    sent: float
    answered: float = 0.0
    status: int = 0
    job_id: str | None = None  # from the 202, or from a 503 that names the job (uncertain)
    terminal: float | None = None


@dataclass
class FaultLog:
    """When things happened to the cluster, as ``(what, time.monotonic())``."""

    events: list[tuple[str, float]] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.events.append((what, time.monotonic()))


def ferry_topics(settings: Settings) -> list[str]:
    return list(topic_specs(settings))


async def leaders(cluster: LocalKafkaCluster, topics: list[str]) -> dict[tuple[str, int], PartitionState]:
    """The partitions of ``topics``, asking until a node answers (one may be down)."""
    while True:
        try:
            return await partition_states(cluster.bootstrap_servers, topics)
        except Exception:  # noqa: BLE001 - a node down or starting: ask again
            await asyncio.sleep(0.2)


async def wait_all_in_sync(cluster: LocalKafkaCluster, topics: list[str]) -> None:
    """Until every partition of ``topics`` has a leader and all three replicas in sync."""
    everyone = sorted(cluster.nodes)
    deadline = time.monotonic() + IN_SYNC_WITHIN
    while time.monotonic() < deadline:
        states = await leaders(cluster, topics)
        if all(state.leader in everyone and sorted(state.isr) == everyone for state in states.values()):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"replicas of {topics} not all in sync after {IN_SYNC_WITHIN} s")


async def make_follower(cluster: LocalKafkaCluster, topics: list[str]) -> int:
    """A node that leads none of ``topics``' partitions: the one leading fewest, restarted with a
    controlled shutdown (its leaderships move to the others and stay there: Kafka moves them back
    only at its next leader-balance check, five minutes by default)."""
    led = Counter(state.leader for state in (await leaders(cluster, topics)).values())
    node = min(cluster.nodes, key=lambda each: led[each])
    await asyncio.to_thread(cluster.stop, node)
    await asyncio.to_thread(cluster.start, node)
    await wait_all_in_sync(cluster, topics)
    still = [tp for tp, state in (await leaders(cluster, topics)).items() if state.leader == node]
    if still:
        raise RuntimeError(f"node {node} still leads {still} after its controlled restart")
    return node


async def broker_fault(cluster: LocalKafkaCluster, plan: BrokerFault, workdir: Path) -> dict:
    """Run ``plan`` on ``cluster`` (every node running) and return what happened (see the module
    docstring); the keys ``lost``, ``refused_but_called``, ``unexpected`` list what must stay empty."""
    if plan.kind not in KINDS:
        raise ValueError(f"unknown fault {plan.kind!r}; choose from {KINDS}")
    await asyncio.to_thread(cluster.start)
    fake_port = free_port()
    settings = stack_settings(cluster.bootstrap_servers, fake_port)
    topics = ferry_topics(settings)
    stack = Stack(settings, workdir / f"broker-{plan.kind}")
    submits: list[Submitted] = []
    faults = FaultLog()
    try:
        fake = RecordingFake(stack, fake_port, plan.provider_latency)
        await wait_port(fake_port)
        api, url = await stack.api()
        worker = await stack.worker()
        await wait_all_in_sync(cluster, [*topics, CONSUMER_OFFSETS])
        victim = await make_follower(cluster, [*topics, CONSUMER_OFFSETS]) if plan.kind == "follower" else None
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:
            began = time.monotonic()
            fault = asyncio.create_task(_fault(cluster, plan, topics, victim, began, faults))
            await _load(session, plan, began, fault, submits)
            await fault
            await _wait_terminal(session, [each for each in submits if each.status == 202])
        alive = {"api": api.process is not None and api.process.poll() is None,
                 "worker": worker.process is not None and worker.process.poll() is None}
        calls = await fake.final()
    finally:
        await stack.close()
    return _outcome(plan, submits, calls, faults, began, alive)


async def _fault(cluster: LocalKafkaCluster, plan: BrokerFault, topics: list[str], victim: int | None,
                 began: float, faults: FaultLog) -> None:
    await asyncio.sleep(max(0.0, began + plan.fault_at - time.monotonic()))
    if plan.kind == "rolling":
        for node in sorted(cluster.nodes):
            faults.note(f"stop {node}")
            await asyncio.to_thread(cluster.stop, node)
            faults.note(f"start {node}")
            await asyncio.to_thread(cluster.start, node)
            await wait_all_in_sync(cluster, [*topics, CONSUMER_OFFSETS])
            faults.note(f"in sync {node}")
        return
    if plan.kind == "controller":
        victim = cluster.active_controller()
    if victim is None:
        led = Counter(state.leader for state in (await leaders(cluster, topics)).values())
        victim = led.most_common(1)[0][0]
    faults.note(f"kill {victim}")
    await asyncio.to_thread(cluster.kill, victim)
    await asyncio.sleep(plan.down_for)
    faults.note(f"start {victim}")
    await asyncio.to_thread(cluster.start, victim)
    await wait_all_in_sync(cluster, topics)
    faults.note(f"in sync {victim}")


async def _load(session: aiohttp.ClientSession, plan: BrokerFault, began: float, fault: asyncio.Task[None],
                submits: list[Submitted]) -> None:
    """Submit at ``plan.rate`` for ``plan.seconds``, and on while the fault runs."""
    tasks = []
    number = 0
    while time.monotonic() < began + plan.seconds or not fault.done():
        delay = began + number / plan.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        each = Submitted(f"job-{number}", time.monotonic())
        submits.append(each)
        tasks.append(asyncio.create_task(_submit(session, each)))
        number += 1
    await asyncio.gather(*tasks)


async def _submit(session: aiohttp.ClientSession, each: Submitted) -> None:
    try:
        async with session.post(CHAT, data=marked_body(each.marker, 200),
                                headers={"Content-Type": "application/json"}) as reply:
            body = await reply.json()
            each.status = reply.status
            each.job_id = body.get("id") if reply.status == 202 else reply.headers.get("x-bf-async-job-id")
    except (aiohttp.ClientError, ValueError):
        each.status = -1  # no HTTP answer at all: as bad as a 500
    each.answered = time.monotonic()


async def _wait_terminal(session: aiohttp.ClientSession, accepted: list[Submitted]) -> None:
    """Poll the accepted jobs until each answers 200 (its end) or the drain's time is up."""
    deadline = time.monotonic() + DRAIN_WITHIN
    waiting = list(accepted)
    while waiting and time.monotonic() < deadline:
        statuses = await asyncio.gather(*(_poll(session, each) for each in waiting))
        now = time.monotonic()
        for each, status in zip(waiting, statuses, strict=True):
            if status == 200:
                each.terminal = now
        waiting = [each for each in waiting if each.terminal is None]
        await asyncio.sleep(0.2)


async def _poll(session: aiohttp.ClientSession, each: Submitted) -> int:
    try:
        async with session.get(f"{CHAT}/{each.job_id}") as reply:
            await reply.read()
            return reply.status
    except aiohttp.ClientError:
        return 0


def _outcome(plan: BrokerFault, submits: list[Submitted], calls: list[list], faults: FaultLog, began: float,
             alive: dict[str, bool]) -> dict:
    called = Counter(call[0] for call in calls if call[0])
    statuses = Counter(str(each.status) for each in submits)
    accepted = [each for each in submits if each.status == 202]
    refused = [each for each in submits if each.status == 503 and each.job_id is None]
    uncertain = [each for each in submits if each.status == 503 and each.job_id is not None]
    unavailable = refused + uncertain
    first_fault = faults.events[0][1] if faults.events else began
    ended = [each.terminal for each in accepted if each.terminal is not None]
    latencies = [1000 * (each.answered - each.sent) for each in submits]
    return {
        "plan": plan.__dict__,
        "events_s": [(what, round(at - began, 2)) for what, at in faults.events],
        "submitted": len(submits),
        "statuses": dict(statuses),
        "accepted": len(accepted),
        "refused_503": len(refused),
        "uncertain_503": len(uncertain),
        # How long a client got 503s: from the first submit answered 503 to the last, by when they were sent.
        "window_503_s": round(max(e.sent for e in unavailable) - min(e.sent for e in unavailable), 2)
        if unavailable else 0.0,
        "submit_ms": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                      "max": round(max(latencies), 1) if latencies else None},
        # When submits waited over a second: (first sent, last sent, slowest ms), seconds from the load's start.
        "slow_submits": _slow_stretches(submits, began),
        "completed": len(ended),
        "all_terminal_s_after_fault": round(max(ended) - first_fault, 2) if len(ended) == len(accepted) else None,
        "duplicate_calls": sum(n - 1 for marker, n in called.items() if n > 1 and marker.startswith("job-")),
        "alive": alive,
        "lost": [each.marker for each in accepted if each.terminal is None],
        "refused_but_called": sorted(each.marker for each in refused if called[each.marker]),
        "uncertain_and_called": sorted(each.marker for each in uncertain if called[each.marker]),
        "unexpected": sorted({str(each.status) for each in submits} - {"202", "503"}),
    }


async def scenario_failover(cluster: LocalKafkaCluster, workdir: Path, plan: BrokerFault,
                            kinds: tuple[str, ...] = KINDS) -> dict:
    """Each kind of broker loss in turn, with the same load; the figures without the lists."""
    results = {}
    for kind in kinds:
        figures = await broker_fault(cluster, BrokerFault(**(plan.__dict__ | {"kind": kind})), workdir)
        results[kind] = figures | {"lost": len(figures["lost"]),
                                   "refused_but_called": len(figures["refused_but_called"]),
                                   "uncertain_and_called": len(figures["uncertain_and_called"])}
    return results


def _slow_stretches(submits: list[Submitted], began: float, slow: float = 1.0, apart: float = 1.0) -> list:
    """Submits answered after more than ``slow`` seconds, grouped into stretches (a gap of
    ``apart`` seconds between two slow submits starts a new one)."""
    stretches: list[list[float]] = []
    for each in sorted((e for e in submits if e.answered - e.sent > slow), key=lambda e: e.sent):
        waited = 1000 * (each.answered - each.sent)
        if stretches and each.sent - began - stretches[-1][1] <= apart:
            stretches[-1][1] = each.sent - began
            stretches[-1][2] = max(stretches[-1][2], waited)
        else:
            stretches.append([each.sent - began, each.sent - began, waited])
    return [[round(first, 2), round(last, 2), round(ms)] for first, last, ms in stretches]
