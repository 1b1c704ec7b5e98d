"""Load under attack: legitimate traffic through the broker while it is being attacked.

    .venv/bin/python scripts/attack_load.py                  # 10,000 requests, concurrency 64
    .venv/bin/python scripts/attack_load.py --requests 2000  # a quicker run
    .venv/bin/python scripts/attack_load.py --workers 2      # the broker as two processes

Everything runs on 127.0.0.1 and is started (and stopped) here: a file-vault home made with
`python -m broker init`, stand-ins for the openai and jina APIs (tests/support/standins.py),
and the daemon as `python -m broker serve` with `[audit] fsync = "batch"`.

Legitimate traffic: `--requests` calls at `--concurrency` in flight (embeddings, chat, and
streamed chat), each checked for status 200 and the stand-in's exact answer. Beside it, for
the whole run, attackers do what tests/security does one at a time:

- wrong tokens from rotating 127/8 source addresses (throttled), foreign Host and Origin
  headers, traversal paths, duplicate Content-Length and CL+TE smuggling over raw sockets,
  oversized bodies, malformed JSON on the lease API, an ungranted consumer name, the broker
  token smuggled in `?key=`;
- 100 half-open connections held open from start to end;
- the grants file rewritten atomically every 100 ms (an extra grant comes and goes);
- an upstream that answers 503 and one that hangs past the idle timeout (jina).

At the end the daemon is stopped, `secret-broker audit verify` must pass, every served
request must have its `proxy.request` line, and the token must never have reached upstream.
The exit status is 0 only if no legitimate request failed and the chain verifies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.client import BrokerClient  # noqa: E402 - after the path set-up
from broker.core.errors import BrokerNotRunning  # noqa: E402
from broker.core.home import Home  # noqa: E402
from broker.service.context import Context  # noqa: E402
from broker.service.secrets import Secrets  # noqa: E402
from tests.support.standins import StandIn  # noqa: E402

OPENAI_KEY = "sk-load-openai-" + os.urandom(8).hex()
JINA_KEY = "jina-load-" + os.urandom(8).hex()
VOYAGE_KEY = "voyage-load-" + os.urandom(8).hex()
EMBED = {"model": "m", "input": "a"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# What each attack must get; anything else is reported and fails the run. A refused
# oversized body may also end in a reset: the broker answers before reading it all.
EXPECTED = {
    "wrong token (rotating 127/8 source)": {"401"}, "foreign Host": {"403"}, "Origin": {"403"},
    "traversal": {"404"}, "duplicate Content-Length": {"400"}, "CL+TE smuggling": {"400"},
    "oversized body": {"413", "ConnectionResetError", "BrokenPipeError"},
    "malformed lease JSON": {"400"}, "ungranted consumer": {"403"}, "token in ?key=": {"200"},
    "upstream 503 (jina)": {"503"}, "upstream hangs past the idle timeout (voyage)": {"504"},
}


def unexpected(run: Run) -> dict[str, set[str]]:
    return {name: set(outcomes) - EXPECTED[name] for name, outcomes in run.attacks.items()
            if name in EXPECTED and set(outcomes) - EXPECTED[name]}


def grants(openai: StandIn, jina: StandIn, voyage: StandIn, extra: bool) -> str:
    def grant(ref: str, consumer: str, host: str) -> str:
        return (f'[[grants]]\nsecret_ref = "{ref}"\nconsumer = "{consumer}"\n'
                f'purposes = ["llm.chat", "llm.embeddings"]\ndelivery = ["http_header_inject"]\n'
                f'allowed_hosts = ["{host}"]\nttl_secs = 300\n\n')
    text = (grant("openai_api_key", "default", openai.host)
            + grant("jina_api_key", "default", jina.host)
            + grant("voyage_api_key", "default", voyage.host))
    return text + (grant("openai_api_key", "sometimes", openai.host) if extra else "")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(".grants.load.tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


class Run:
    def __init__(self, home: Path, port: int, token: str, openai: StandIn) -> None:
        self.home, self.port, self.token, self.openai = home, port, token, openai
        self.base = f"http://127.0.0.1:{port}"
        self.results: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.attacks: dict[str, Counter[str]] = {}
        self.served_extra = 0  # 200s that are not legit traffic (the ?key= attack)
        self.done = asyncio.Event()

    def saw(self, attack: str, outcome: object) -> None:
        self.attacks.setdefault(attack, Counter())[str(outcome)] += 1

    # --- legitimate traffic -----------------------------------------------------------------

    async def legit_one(self, session: aiohttp.ClientSession, i: int) -> None:
        kind = ("stream", "chat", "embed", "embed", "embed")[i % 5]
        headers = {"Authorization": f"Bearer {self.token}"}
        started = time.perf_counter()
        try:
            if kind == "embed":
                async with session.post(f"{self.base}/proxy/openai/v1/embeddings", json=EMBED,
                                        headers=headers) as r:
                    body = await r.read()
                    ok = r.status == 200 and json.loads(body)["data"][0]["embedding"] == \
                        StandIn.embedding(0)
            elif kind == "chat":
                async with session.post(f"{self.base}/proxy/openai/v1/chat/completions",
                                        json=CHAT, headers=headers) as r:
                    body = await r.read()
                    ok = r.status == 200 and json.loads(body)["choices"][0]["message"][
                        "content"] == self.openai.expected_text
            else:
                async with session.post(f"{self.base}/proxy/openai/v1/chat/completions",
                                        json={**CHAT, "stream": True}, headers=headers) as r:
                    body = await r.read()
                    ok = r.status == 200 and body.rstrip().endswith(b"data: [DONE]")
            status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            ok, status = False, type(exc).__name__
        self.latencies.append(time.perf_counter() - started)
        self.results["ok" if ok else "failed"] += 1
        if not ok:
            self.failures.append(f"{kind}: {status}")

    async def legit(self, total: int, concurrency: int) -> None:
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            queue = iter(range(total))

            async def worker() -> None:
                for i in queue:
                    await self.legit_one(session, i)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.done.set()

    # --- attacks ------------------------------------------------------------------------------

    async def raw(self, data: bytes, source: str | None = None) -> bytes:
        """Exactly these bytes on a new connection; the reply up to EOF (10 s at most)."""
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=local)
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    @staticmethod
    def status_of(reply: bytes) -> str:
        line = reply.split(b"\r\n", 1)[0].split()
        return line[1].decode() if len(line) > 1 else "closed"

    def request(self, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes = b"", token: str | None = None) -> bytes:
        """Raw request bytes; the owner's token unless `token` names another."""
        hdrs = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        hdrs["Authorization"] = f"Bearer {token or self.token}"
        hdrs.setdefault("Content-Length", str(len(body)))
        hdrs["Connection"] = "close"
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                           hdrs.items())
        return head.encode() + b"\r\n" + body

    async def attacker(self, name: str, make: Any, pause: float = 0.0) -> None:
        n = 0
        while not self.done.is_set():
            data, source = make(n)
            try:
                outcome: object = self.status_of(await self.raw(data, source))
            except (OSError, TimeoutError) as exc:
                outcome = type(exc).__name__
            self.saw(name, outcome)
            n += 1
            if name == "token in ?key=" and outcome == "200":
                self.served_extra += 1
            await asyncio.sleep(pause)

    def attack_kinds(self) -> dict[str, Any]:
        embed = json.dumps(EMBED).encode()
        path = "/proxy/openai/v1/embeddings"
        cl = {"Content-Type": "application/json"}
        return {
            "wrong token (rotating 127/8 source)": lambda n: (self.request(
                "GET", "/v1/health", token=f"sbt_guess{n}"), f"127.0.{n % 200}.{2 + n % 250}"),
            "foreign Host": lambda n: (self.request(
                "POST", path, {**cl, "Host": "evil.example"}, embed), None),
            "Origin": lambda n: (self.request(
                "POST", path, {**cl, "Origin": "http://evil.example"}, embed), None),
            "traversal": lambda n: (self.request("POST", [
                "/proxy/openai/v1/../v1/chat/completions", "/proxy/openai/v1%2fembeddings",
                "/proxy/openai//evil.example/v1/embeddings", "/proxy/%2e%2e/v1/leases"][n % 4],
                cl, embed), None),
            "duplicate Content-Length": lambda n: (self.request(
                "POST", path, {**cl, "Content-Length": f"{len(embed)}\r\nContent-Length: 2"},
                embed), None),
            "CL+TE smuggling": lambda n: (self.request(
                "POST", path, {**cl, "Transfer-Encoding": "chunked"},
                b"0\r\n\r\nPOST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: x\r\n\r\n"), None),
            "oversized body": lambda n: (self.request(
                "POST", path, cl, b'{"input": "' + b"a" * 1_100_000 + b'"}'), None),
            "malformed lease JSON": lambda n: (self.request(
                "POST", "/v1/leases", cl, [b"{", b"[" * 5000, b'{"secret_ref": 1}'][n % 3]),
                None),
            "ungranted consumer": lambda n: (self.request(
                "POST", path, {**cl, "X-Broker-Consumer": "intruder"}, embed), None),
            "token in ?key=": lambda n: (self.request(
                "POST", f"{path}?key={self.token}", cl, embed), None),
            "upstream 503 (jina)": lambda n: (self.request(
                "POST", "/proxy/jina/v1/embeddings", cl, embed), None),
            "upstream hangs past the idle timeout (voyage)": lambda n: (self.request(
                "POST", "/proxy/voyage/v1/embeddings", cl, embed), None),
        }

    async def half_open(self, n: int) -> None:
        held = []
        for i in range(n):
            _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            # Half stop inside their headers; half are authenticated and stop inside the body,
            # so each of those holds a request handler for the whole run.
            writer.write(b"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         + (b"Authorization: Bearer " + self.token.encode()
                            + b"\r\nContent-Length: 100\r\n\r\n{" if i % 2 else b"X-Slow: "))
            held.append(writer)
        self.saw("half-open connections held", n)
        await self.done.wait()
        for writer in held:
            writer.close()

    async def churn_grants(self, openai: StandIn, jina: StandIn, voyage: StandIn) -> None:
        path = self.home / "secrets.grants.toml"
        n = 0
        while not self.done.is_set():
            write_atomically(path, grants(openai, jina, voyage, extra=n % 2 == 1))
            n += 1
            await asyncio.sleep(0.1)
        write_atomically(path, grants(openai, jina, voyage, extra=False))
        self.saw("grants rewrites (atomic)", n)


def start_daemon(home: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes],
                                                                       int, str]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--listen",
                                 "127.0.0.1:0", "--log-format", "json"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    unix = BrokerClient(socket_path=home / "run" / "broker.sock", timeout=2.0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited:\n{log.read_text()}")
        try:
            status = unix.status()
            break
        except BrokerNotRunning:
            time.sleep(0.05)
    else:
        raise SystemExit("the daemon did not answer in 30 s")
    port = int(status["listen"].rsplit(":", 1)[1])
    return proc, port, (home / "broker.token").read_text().strip()


async def main_async(args: argparse.Namespace, run: Run, openai: StandIn, jina: StandIn,
                     voyage: StandIn) -> float:
    started = time.perf_counter()
    tasks = [asyncio.create_task(run.half_open(100)),
             asyncio.create_task(run.churn_grants(openai, jina, voyage))]
    for name, make in run.attack_kinds().items():
        workers = 4 if name.startswith("wrong token") else 1
        tasks += [asyncio.create_task(run.attacker(name, make, pause=0.005))
                  for _ in range(workers)]
    await run.legit(args.requests, args.concurrency)
    elapsed = time.perf_counter() - started
    await asyncio.gather(*tasks)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="the broker's worker processes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sb-load-", dir="/tmp"))
    home = work / "h"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_BROKER_")}
    env["SECRET_BROKER_HOME"] = str(home)
    openai = StandIn("openai", OPENAI_KEY).start()
    jina = StandIn("jina", JINA_KEY).start()
    voyage = StandIn("voyage", VOYAGE_KEY).start()
    proc = None
    try:
        subprocess.run([sys.executable, "-m", "broker", "init", "--backend", "file-vault"],
                       env=env, check=True, capture_output=True)
        ctx = Context.open(Home(home), env)
        secrets = Secrets(ctx)
        secrets.add("openai_api_key", "openai", "api_key", OPENAI_KEY)
        secrets.add("jina_api_key", "jina", "api_key", JINA_KEY)
        secrets.add("voyage_api_key", "voyage", "api_key", VOYAGE_KEY)
        ctx.audit_log.close()
        ctx.metadata.close()
        (home / "config.toml").write_text(
            f'[store]\nbackend = "file-vault"\n[broker]\nworkers = {args.workers}\n'
            '[limits]\nmax_body_bytes = 1048576\n'
            'read_timeout_secs = 2\n[audit]\nfsync = "batch"\n'
            f'[providers.openai]\nbase_url = "{openai.base_url}"\n'
            f'[providers.jina]\nbase_url = "{jina.base_url}/_status/503"\n'
            f'[providers.voyage]\nbase_url = "{voyage.base_url}/_hang"\n')
        write_atomically(home / "secrets.grants.toml", grants(openai, jina, voyage, extra=False))
        proc, port, token = start_daemon(home, env, work / "daemon.log")
        run = Run(home, port, token, openai)
        elapsed = asyncio.run(main_async(args, run, openai, jina, voyage))
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        verify = subprocess.run([sys.executable, "-m", "broker", "audit", "verify"], env=env,
                                capture_output=True, text=True)
        events = [json.loads(line) for line in (home / "audit.log").read_bytes().splitlines()]
        served = sum(1 for e in events if e["event"] == "proxy.request" and e.get("status") == 200
                     and e.get("provider") == "openai")
        token_upstream = sum(token in json.dumps(r.headers) + r.query
                             for s in (openai, jina, voyage) for r in s.requests)
        report(args, run, elapsed, verify, events, served, token_upstream)
        ok = (run.results["failed"] == 0 and verify.returncode == 0 and token_upstream == 0
              and served == run.results["ok"] + run.served_extra and not unexpected(run))
        return 0 if ok else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for stand in (openai, jina, voyage):
            stand.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, run: Run, elapsed: float,
           verify: subprocess.CompletedProcess[str], events: list[dict[str, Any]],
           served: int, token_upstream: int) -> None:
    lat = sorted(run.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    attacks = sum(sum(c.values()) for name, c in run.attacks.items()
                  if not name.startswith(("half-open", "grants")))
    print(f"legitimate requests: {sum(run.results.values())} at concurrency {args.concurrency}: "
          f"{run.results['ok']} ok, {run.results['failed']} failed")
    print(f"  wall time {elapsed:.1f} s, {sum(run.results.values()) / elapsed:.0f} legit req/s; "
          f"latency p50 {pct(0.50):.1f} ms, p95 {pct(0.95):.1f} ms, p99 {pct(0.99):.1f} ms, "
          f"mean {statistics.mean(lat) * 1000:.1f} ms")
    print(f"attack requests during the run: {attacks}")
    for name, outcomes in run.attacks.items():
        print(f"  {name}: " + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())))
    kinds = Counter(e["event"] for e in events)
    print(f"audit: {len(events)} events ({', '.join(f'{k} {v}' for k, v in kinds.most_common())})")
    print(f"  openai proxy.request with status 200: {served} "
          f"(legit ok {run.results['ok']} + token-in-query {run.served_extra})")
    print(f"  audit verify: exit {verify.returncode}: {(verify.stdout + verify.stderr).strip()}")
    print(f"broker token seen upstream: {token_upstream} times")
    print(f"attack outcomes other than the expected refusal: {unexpected(run) or 'none'}")
    for failure in run.failures[:20]:
        print(f"  FAILED {failure}")


if __name__ == "__main__":
    raise SystemExit(main())
