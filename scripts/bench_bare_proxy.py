"""The simplest streaming aiohttp reverse proxy: the floor the broker's own work is measured on.

    python scripts/bench_bare_proxy.py --port P --upstream-port U [--key KEY] [--processes N]

For scripts/bench.py ("bare"): what aiohttp + uvloop cost on the broker's path with no
policy, audit or logging. `/proxy/openai/<path>?<query>` goes to the upstream's `/<path>?<query>`
over one pooled ClientSession, with `Authorization: Bearer KEY` (or $BENCH_UPSTREAM_KEY)
swapped in as nginx does; the answer streams back chunk by chunk. With --processes N > 1
the parent binds the socket and N forked workers serve it (the broker's --workers, at its
simplest), so the bench can see how far the framework alone scales.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from yarl import URL

PREFIX = "/proxy/openai"
HOP = {"host", "authorization", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
SESSION = web.AppKey("session", ClientSession)

try:  # as the broker picks its loop: uvloop when installed
    import uvloop

    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:
    new_loop = asyncio.new_event_loop


def make_app(upstream: str, key: str) -> web.Application:
    auth = f"Bearer {key}"

    async def session(app: web.Application) -> AsyncIterator[None]:
        # One pool for every request, as the broker keeps one; no decompression, no cookies.
        app[SESSION] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False,
                                     cookie_jar=DummyCookieJar(),
                                     timeout=ClientTimeout(total=None, sock_read=300))
        yield
        await app[SESSION].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Authorization"] = auth
        url = URL(upstream + request.raw_path.removeprefix(PREFIX), encoded=True)  # as sent
        async with request.app[SESSION].request(request.method, url, headers=headers,
                                                data=await request.read()) as up:
            out = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", PREFIX + "/{tail:.*}", proxy)
    return app


def serve(sock: socket.socket, upstream: str, key: str) -> None:
    # backlog: listen() is called again on the socket, with this (aiohttp's default is 128).
    web.run_app(make_app(upstream, key), sock=sock, backlog=4096, access_log=None, print=None,
                loop=new_loop())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--key", default=os.environ.get("BENCH_UPSTREAM_KEY"),
                    help="the real key (default: $BENCH_UPSTREAM_KEY, kept out of `ps`)")
    ap.add_argument("--processes", type=int, default=1)
    a = ap.parse_args()
    if not a.key:
        ap.error("--key or $BENCH_UPSTREAM_KEY is required")
    sock = socket.create_server(("127.0.0.1", a.port), backlog=4096)
    upstream = f"http://127.0.0.1:{a.upstream_port}"
    if a.processes <= 1:
        serve(sock, upstream, a.key)
        return
    pids: list[int] = []

    def forward(signum: int, _frame: object) -> None:  # each worker stops as run_app does
        for pid in pids:
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for _ in range(a.processes):
        pid = os.fork()
        if pid == 0:  # a worker: its own event loop on the shared socket
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            serve(sock, upstream, a.key)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
