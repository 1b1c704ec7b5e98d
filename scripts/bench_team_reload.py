#!/usr/bin/env python3
"""Team reload under load: does re-reading a 200-secret team disturb requests in flight?

A real daemon serves a team of 200 secrets (one of them the gateway's OpenAI key) from a
git checkout, in front of the fast stand-in upstream (scripts/bench_upstream.py). Clients
keep `--concurrency` embeddings requests in flight through the gateway for `--seconds`,
twice: once quiet, once while the team is re-read and re-verified every `--every` seconds
(POST /v1/admin/teams/reload, what `team pull` does after each pull). It prints requests,
errors, p50 and p99 for both phases, and the reloads done. Numbers, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.core.home import Home  # noqa: E402
from broker.service.context import Context  # noqa: E402
from broker.service.team import Teams  # noqa: E402
from broker.team import edit  # noqa: E402

KEY = "sk-bench-team-0123456789"
SECRETS = 200
GIT = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
       "GIT_COMMITTER_EMAIL": "b@x", "GIT_CONFIG_GLOBAL": "/dev/null"}


def run(env: dict[str, str], *args: str, stdin: bytes = b"", cwd: Path = ROOT) -> str:
    proc = subprocess.run(args, input=stdin, env=env, cwd=cwd, capture_output=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{args}: {proc.stderr.decode()}")
    return proc.stdout.decode()


def setup(tmp: Path, upstream: int) -> tuple[Home, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_BROKER_")}
    env.update(GIT, SECRET_BROKER_HOME=str(tmp / "home"))
    sb = (sys.executable, "-m", "broker")
    run(env, *sb, "init", "--backend", "file-vault")
    repo = tmp / "repo"
    run(env, "git", "init", "-q", str(repo))
    run(env, "git", "commit", "-q", "--allow-empty", "-m", "start", cwd=repo)
    run(env, *sb, "team", "init", "--name", "bench", "--as", "admin", "--dir", str(repo))
    run(env, *sb, "team", "group", "add", "llm", "--dir", str(repo))
    home = Home(tmp / "home")
    ctx = Context.open(home, env)
    teams = Teams(ctx)
    checkout = teams.load(teams.configured()["bench"], ref="HEAD")
    actor = teams.actor(checkout)
    change: edit.Files = {}
    for i in range(SECRETS):
        change.update(edit.set_secret(checkout.team, "llm", f"key_{i:03d}",
                                      KEY if i == 0 else f"sk-other-{i:04d}-0123456789",
                                      actor, provider="openai", kind="api_key"))
    teams.commit(checkout, change, "200 secrets", "secret.added", count=SECRETS)
    config = home.config
    config.write_text(config.read_text() + f'\n[providers.openai]\nbase_url = '
                      f'"http://127.0.0.1:{upstream}"\nsecret_ref = "bench.key_000"\n')
    home.grants.write_text('[[grants]]\nsecret_ref = "bench.key_000"\nconsumer = "default"\n'
                           'purposes = ["llm.embeddings"]\ndelivery = ["http_header_inject"]\n'
                           f'allowed_hosts = ["127.0.0.1:{upstream}"]\nttl_secs = 3600\n')
    return home, env


def start(args: list[str], env: dict[str, str], ready: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    assert proc.stdout is not None
    if ready:
        found, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if found else ""
        if not line.startswith(ready):
            proc.kill()
            raise SystemExit(f"{args[1]} did not start: {line!r}")
        return proc, line
    return proc, ""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000 if values else 0.0


async def phase(url: str, token: str, sock: str, seconds: float, concurrency: int,
                every: float | None) -> dict[str, float]:
    latencies: list[float] = []
    errors = reloads = 0
    stop = time.monotonic() + seconds
    body = json.dumps({"model": "m", "input": "a"}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def client() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                started = time.perf_counter()
                async with s.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    if reply.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        async def reloader() -> None:
            nonlocal reloads
            unix = aiohttp.UnixConnector(path=sock)
            async with aiohttp.ClientSession(connector=unix) as admin:
                while every is not None and time.monotonic() < stop:
                    async with admin.post("http://localhost/v1/admin/teams/reload") as reply:
                        await reply.read()
                        reloads += reply.status == 200
                    await asyncio.sleep(every)

        await asyncio.gather(reloader(), *(client() for _ in range(concurrency)))
    return {"requests": len(latencies), "errors": errors, "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99), "reloads": reloads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between reloads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-bench-team-") as tmp_name:
        tmp = Path(tmp_name)
        upstream, line = start([sys.executable, "scripts/bench_upstream.py", "--key", KEY],
                               dict(os.environ), "READY ")
        try:
            home, env = setup(tmp, int(line.split()[1]))
            daemon, _ = start([sys.executable, "-m", "broker", "serve", "--listen",
                               "127.0.0.1:0"], env, "")
            try:
                deadline = time.monotonic() + 30
                while not home.socket.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                status = json.loads(run(env, sys.executable, "-m", "broker", "status",
                                        "--json"))
                port = status["listen"].rsplit(":", 1)[1]
                url = f"http://127.0.0.1:{port}/proxy/openai/v1/embeddings"
                token = home.token.read_text().strip()
                results = {}
                for name, every in (("quiet", None), ("reloading", args.every)):
                    results[name] = asyncio.run(phase(url, token, str(home.socket),
                                                      args.seconds, args.concurrency, every))
            finally:
                daemon.terminate()
                daemon.wait(30)
        finally:
            upstream.terminate()
            upstream.wait(10)
    print(f"team of {SECRETS} secrets; {args.concurrency} requests in flight for "
          f"{args.seconds:.0f} s per phase; reload every {args.every} s in the second")
    print("| phase | requests | errors | p50 (ms) | p99 (ms) | reloads |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['requests']:.0f} | {r['errors']:.0f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['reloads']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
