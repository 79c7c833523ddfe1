"""The submit ceiling: a bare aiohttp handler that reads the body and answers 202 with a fixed body.

    python -m bench.bare_server --port 8181
"""

from __future__ import annotations

import argparse

from aiohttp import web

from api.server import LISTEN_BACKLOG
from app.runtime import use_uvloop

ACCEPTED = (b'{"id": "00000000-0000-4000-8000-000000000000", "status": "pending", '
            b'"created_at": "2026-01-01T00:00:00.000Z"}')


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ACCEPTED, status=202, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server")
    parser.add_argument("--port", type=int, default=8181)
    args = parser.parse_args()
    use_uvloop()  # the API's loop and backlog: the ceiling differs from Ferry's API only in the handler
    app = web.Application()
    app.router.add_post("/{tail:.*}", accept)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=LISTEN_BACKLOG)


if __name__ == "__main__":
    main()
