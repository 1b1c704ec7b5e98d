#!/usr/bin/env python3
"""Walk one warm proxied request and print the project modules it runs through.

The daemon's application is built in this process on a throwaway home (file vault, one
key, one grant) and a loopback stand-in upstream. Two requests warm it up (the lease, the
value cache); the third, `POST /proxy/openai/v1/embeddings`, runs under a profiler that
notes every call from one project module into another. It prints the modules in the order
they are first entered, and the boundaries: calls into another module, and how many of
them go back into a module the request had already left.

`--max N` exits 1 when the request enters more than N modules: the test command runs it
so the path drawn in docs/architecture.md stays the path the code takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.config import load_config  # noqa: E402
from broker.core import logs  # noqa: E402
from broker.core.home import Home  # noqa: E402
from broker.server.app import create_app  # noqa: E402
from broker.server.state import ACCESS, SECRETS, AuditRecorder, LiveConfig  # noqa: E402
from broker.service.context import Context  # noqa: E402

KEY = "sk-trace-0123456789abcdef"
BODY = json.dumps({"model": "m", "input": "a"}).encode()
PROJECT = ("broker", "grants")


def _module(frame: FrameType | None) -> str | None:
    """The project module `frame` runs in, or None (the stdlib, aiohttp, …)."""
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name if name.split(".")[0] in PROJECT else None


class Walk:
    """Calls from one project module into another, noted by a profile hook."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.boundaries: list[tuple[str | None, str]] = []
        self.calls: list[str] = []

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        here = _module(frame)
        if here is None:
            return
        caller = frame.f_back
        while caller is not None and _module(caller) is None:
            caller = caller.f_back
        there = _module(caller)
        if here not in self.order:
            self.order.append(here)
        if there != here:
            self.boundaries.append((there, here))
            self.calls.append(f"{there} -> {here}.{frame.f_code.co_qualname}")

    def back_into(self) -> int:
        """Boundaries that re-enter a module the request had already entered and left."""
        seen: set[str] = set()
        count = 0
        for _, into in self.boundaries:
            count += into in seen
            seen.add(into)
        return count


def make_home(tmp: Path, upstream: str) -> Home:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_BROKER_")}
    env["SECRET_BROKER_HOME"] = str(tmp / "h")
    for args, stdin in ((["init", "--backend", "file-vault"], b""),
                        (["add", "@openai_api_key", "--provider", "openai", "--kind", "api_key",
                          "--stdin"],
                         KEY.encode())):
        subprocess.run([sys.executable, "-m", "broker", *args], input=stdin, env=env,
                       cwd=ROOT, check=True, capture_output=True, timeout=120)
    home = Home(tmp / "h")
    for path, text in (
        (home.root / "config.toml",
         f'[store]\nbackend = "file-vault"\n\n[providers.openai]\nbase_url = "http://{upstream}"\n'),
        (home.grants,
         '[[grants]]\nsecret_ref = "openai_api_key"\nconsumer = "default"\n'
         'purposes = ["llm.embeddings"]\ndelivery = ["http_header_inject"]\n'
         f'allowed_hosts = ["{upstream}"]\nttl_secs = 3600\n'),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    return home


async def embeddings(request: web.Request) -> web.Response:
    if request.headers.get("Authorization") != f"Bearer {KEY}":
        return web.json_response({"error": "wrong key"}, status=401)
    await request.read()
    return web.json_response({"data": [{"embedding": [0.0]}],
                              "usage": {"prompt_tokens": 1, "total_tokens": 1}})


async def walk(tmp: Path) -> Walk:
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/embeddings", embeddings)
    upstream_runner = web.AppRunner(upstream_app, access_log=None)
    await upstream_runner.setup()
    site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    home = make_home(tmp, upstream)
    logs.configure("json")  # as the daemon logs (on stderr), redaction included
    service = Context.open(home, {}, actor="broker")
    audit = AuditRecorder(service)
    app = create_app(service, LiveConfig(home, load_config(home), audit), audit, "127.0.0.1:0")
    app[ACCESS].reload("startup")
    app[SECRETS].refresh()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    broker_site = web.TCPSite(runner, "127.0.0.1", 0)
    await broker_site.start()
    port = broker_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    headers = {"Authorization": f"Bearer {home.token.read_text().strip()}",
               "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/proxy/openai/v1/embeddings"
    trace = Walk()
    async with aiohttp.ClientSession() as client:
        for traced in (False, False, True):
            if traced:
                threading.setprofile(trace.hook)
                sys.setprofile(trace.hook)
            try:
                async with client.post(url, data=BODY, headers=headers) as response:
                    await response.read()
            finally:
                sys.setprofile(None)
                threading.setprofile(None)  # type: ignore[arg-type]
            if response.status != 200:
                raise SystemExit(f"the request failed: {response.status}")
    await runner.cleanup()
    await upstream_runner.cleanup()
    service.audit_log.flush()
    service.audit_log.close()
    return trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, help="exit 1 when more modules are entered")
    parser.add_argument("--calls", action="store_true", help="print every crossing call")
    parser.add_argument("--json", action="store_true", help="print the modules as JSON only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-trace-") as tmp:
        trace = asyncio.run(walk(Path(tmp)))
    if args.json:
        print(json.dumps({"modules": trace.order, "crossings": len(trace.boundaries)}))
        return 0
    print(f"one warm POST /proxy/openai/v1/embeddings enters {len(trace.order)} modules:")
    for name in trace.order:
        print(f"  {name}")
    print(f"{len(trace.boundaries)} calls cross into another module, "
          f"{trace.back_into()} of them back into one already entered")
    if args.calls:
        print("\n".join(trace.calls))
    if args.max is not None and len(trace.order) > args.max:
        print(f"more than {args.max} modules", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
