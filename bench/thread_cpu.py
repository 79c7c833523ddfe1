"""CPU time of each thread of a running process over a window, or over a command's run (Linux).

    python -m bench.thread_cpu --pid PID --seconds 10
    python -m bench.thread_cpu --pid PID -- python -m bench.one_job_latency --jobs 1000

Reads each thread's run time from ``/proc/PID/task/TID/schedstat`` (nanoseconds the scheduler
ran it, exact where ``/proc/PID/stat``'s ticks are 10 ms samples) before and after, and prints one
line per thread that ran: its id, its name and the milliseconds. The worker's two busy threads are
its main thread (the event loop: agents, provider calls, table writes) and Faust's consumer thread
(aiokafka's fetches); the one whose id is the process's pid is the main thread.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def thread_times(pid: int) -> dict[int, tuple[str, int]]:
    """Each live thread of ``pid``: its name and the nanoseconds it has run so far."""
    times: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran = int((task / "schedstat").read_text().split()[0])
            name = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        times[int(task.name)] = (name, ran)
    return times


def cpu_between(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> list[tuple[int, str, float]]:
    """(thread id, name, milliseconds run) of each thread that ran between the two readings, most first;
    a thread that started meanwhile counts from zero."""
    ran = [(tid, name, (ns - before.get(tid, (name, 0))[1]) / 1e6) for tid, (name, ns) in after.items()]
    return sorted((row for row in ran if row[2] > 0), key=lambda row: -row[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the process whose threads to read")
    parser.add_argument("--seconds", type=float, default=10.0, help="the window, when no command is given")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- a command to time the threads over")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        before = thread_times(args.pid)
    except FileNotFoundError:
        print(f"no process {args.pid}", file=sys.stderr)
        return 2
    if command:
        code = subprocess.call(command)
        if code:
            print(f"the command exited with {code}", file=sys.stderr)
            return code
    else:
        time.sleep(args.seconds)
    try:
        after = thread_times(args.pid)
    except FileNotFoundError:
        print(f"process {args.pid} ended before the second reading", file=sys.stderr)
        return 2
    for tid, name, ms in cpu_between(before, after):
        print(f"{tid:>8} {name:<16} {ms:10.1f} ms{'  (main thread)' if tid == args.pid else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
