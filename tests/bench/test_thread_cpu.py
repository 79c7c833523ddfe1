"""bench.thread_cpu: each thread's CPU over a window, read from the scheduler's own accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from bench.thread_cpu import cpu_between, thread_times
from deploy.processes import REPO_ROOT


def test_a_busy_thread_is_counted_and_an_idle_one_is_not() -> None:
    stop, worked = threading.Event(), threading.Event()

    def work() -> None:
        for _ in range(300):
            sum(range(10_000))
        worked.set()
        stop.wait()  # alive at the second reading

    idle = threading.Thread(target=stop.wait, name="idle")
    busy = threading.Thread(target=work, name="busy")
    idle.start()
    before = thread_times(os.getpid())
    busy.start()
    worked.wait()  # the main thread waits: only the busy thread works
    after = thread_times(os.getpid())
    stop.set()
    busy.join()
    idle.join()

    ran = {tid: ms for tid, _, ms in cpu_between(before, after)}
    assert busy.native_id in ran  # started after the first reading: counted from zero
    # The idle thread may have run a few microseconds finishing its start, nothing like the work.
    assert ran[busy.native_id] > 100 * ran.get(idle.native_id, 0)
    assert max(ran, key=lambda tid: ran[tid]) == busy.native_id


def test_the_command_line_times_a_command() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        done = subprocess.run([sys.executable, "-m", "bench.thread_cpu", "--pid", str(sleeper.pid), "--",
                               sys.executable, "-c", "pass"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert done.stderr == ""  # a sleeping process: a line only for a thread that ran (perhaps none)
    assert all(line.split()[0] == str(sleeper.pid) for line in done.stdout.splitlines())


def test_a_process_that_is_not_there_gets_a_clear_error() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for argv in (["--seconds", "0"], ["--", sys.executable, "-c", "pass"]):
        done = subprocess.run([sys.executable, "-m", "bench.thread_cpu", "--pid", str(gone.pid), *argv],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr, done.stdout) == (2, f"no process {gone.pid}\n", "")


def test_a_process_that_ends_during_the_window_gets_a_clear_error() -> None:
    brief = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    reaper = threading.Thread(target=brief.wait)  # reaped as it ends: a zombie would still be readable
    reaper.start()
    try:
        done = subprocess.run([sys.executable, "-m", "bench.thread_cpu", "--pid", str(brief.pid), "--",
                               sys.executable, "-c", "import time; time.sleep(4)"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    finally:
        reaper.join()
    assert (done.returncode, done.stderr) == (2, f"process {brief.pid} ended before the second reading\n")
