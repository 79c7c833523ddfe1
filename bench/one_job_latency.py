"""Submit-to-completed time of single jobs, one at a time, against a running Ferry.

    python -m bench.one_job_latency [--url http://127.0.0.1:8080] [--jobs 100] [--model fake/gpt-4o-mini]

Each job is submitted, then polled every millisecond until it answers 200; the figure is the
time from sending the POST to reading the 200 (so it includes up to ~1 ms of poll spacing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp


async def run(url: str, jobs: int, model: str) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}]}
    timings = []
    async with aiohttp.ClientSession(base_url=url) as session:
        for _ in range(jobs):
            began = time.perf_counter()
            async with session.post("/v1/async/chat/completions", json=body) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            while True:
                async with session.get(f"/v1/async/chat/completions/{job_id}") as response:
                    if response.status == 200:
                        assert (await response.json())["status"] == "completed"
                        break
                await asyncio.sleep(0.001)
            timings.append(time.perf_counter() - began)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--model", default="fake/gpt-4o-mini")
    args = parser.parse_args()
    timings = sorted(asyncio.run(run(args.url, args.jobs, args.model)))
    ms = [t * 1000 for t in timings]
    print(f"{len(ms)} jobs, submit -> completed: median {statistics.median(ms):.1f} ms, "
          f"p90 {ms[int(len(ms) * 0.9) - 1]:.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
