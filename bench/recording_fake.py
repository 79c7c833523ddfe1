"""The fake OpenAI provider with a call log the benchmarks read: who was called, when, how often.

    python -m bench.recording_fake --port 8099 [--latency 0.05]

It serves ``/v1`` as ``deploy.fakes.openai_server`` does, and ``GET /bench/calls``: every chat
call so far as ``[marker, received_at, answered_at]`` (``time.monotonic()`` seconds, comparable
with other processes' on the same machine; ``answered_at`` is null while the call is in flight)
and ``in_flight``; ``?since=N`` leaves out the first N calls. The marker is the last message's
first word, so a job's calls can be counted.
"""

from __future__ import annotations

import argparse
import time

from aiohttp import web

from deploy.fakes.base import LISTEN_BACKLOG
from deploy.fakes.openai_server import FakeOpenAI


class CallLog:
    def __init__(self) -> None:
        self.calls: list[list] = []  # [marker, received_at, answered_at]
        self.in_flight = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        self.in_flight += 1
        entry: list = [None, time.monotonic(), None]
        try:
            body = await request.json()
            entry[0] = str(body["messages"][-1]["content"]).split(" ", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError):
            pass  # not a chat call: logged without a marker
        self.calls.append(entry)
        try:
            return await handler(request)  # the body is cached: the fake reads it again
        finally:
            entry[2] = time.monotonic()
            self.in_flight -= 1

    async def report(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", 0))  # calls already read: a poll fetches only the new ones
        return web.json_response({"in_flight": self.in_flight, "total": len(self.calls), "calls": self.calls[since:]})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recording_fake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    log = CallLog()
    app = FakeOpenAI(latency=args.latency).app()
    app.middlewares.append(log.middleware)
    app.router.add_get("/bench/calls", log.report)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, backlog=LISTEN_BACKLOG, print=None,
                # Calls still sleeping are not waited for: a stop is the end of a run.
                shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
