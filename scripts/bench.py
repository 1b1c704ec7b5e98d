"""Benchmark: secret-broker beside a direct connection to the same upstream (nginx, bare aiohttp).

    .venv/bin/python scripts/bench.py             # full run (~5 min), writes docs/benchmarks.md
    .venv/bin/python scripts/bench.py --quick     # the same phases, shorter (~2 min)
    .venv/bin/python scripts/bench.py --no-docs   # print the table only

What runs, all on 127.0.0.1 and all started (and stopped) by this script:

- a fast stand-in upstream (scripts/bench_upstream.py: raw asyncio + uvloop, its own process)
  that checks every request carries the real key;
- the broker on its real path: `python -m broker init --backend file-vault` (key file), the
  key added with `add --stdin`, a grants file, `[audit] fsync = "batch"`, then
  `python -m broker serve --log-format json` (every request: token, grants/lease, key swap,
  hash-chained audit line, JSON log line);
- nginx as a plain reverse proxy that also swaps the key, where `nginx` is installed (the
  column is left out otherwise), one worker process like the broker's one event loop;
- "bare": scripts/bench_bare_proxy.py, the simplest streaming aiohttp proxy on uvloop (one
  pooled ClientSession, the key swap, no policy, audit or logging): what the framework alone
  costs, so the broker's own work is the difference between it and bare.

Each phase measures them side by side (direct, nginx, bare, broker), in the same run:

1. non-streaming POST (~1 KB JSON answer, embeddings-sized): latency at concurrency 1 and
   throughput at concurrency 32, with wrk (a Lua script sets the body and Authorization);
2. streaming: time to first byte (sequential streams) and the delay each of 200 SSE chunks
   gains on its way (the upstream stamps each chunk with time.time_ns(); the client, on the
   same clock, subtracts), with the Python load generator below (wrk cannot see chunks);
3. 1,000 streams open at once: errors, the broker's RSS (VmRSS, sampled every 100 ms);
4. idle RSS, and CPU time per 1,000 requests (utime+stime from /proc/<pid>/stat).

With --workers 1,2 (say): for each N, the broker restarted with `serve --workers N` and
the bare proxy with `--processes N`, POST throughput at concurrency 32 and 64 (the workers
sweep: how far more processes scale each).

Unless --no-profile: strace -c (if installed) counts each proxy's syscalls per POST, and
py-spy (if installed) samples the broker under the POST load and under many streams; the
hottest functions go into the report. Other processes and CPU steal on the machine are
measured during every phase and reported beside the results.

The load generator's own CPU is reported for each streaming phase, and wrk reaches many times
the broker's rate on the direct path, so neither is what limits the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT  # the tree whose broker/ and grants/ run (--src: e.g. a patched copy, for A/B)
PHASES = ("post", "streams", "open", "profile")
UPSTREAM_SCRIPT = Path(__file__).resolve().parent / "bench_upstream.py"
BARE_SCRIPT = Path(__file__).resolve().parent / "bench_bare_proxy.py"
PATHS = ("direct", "nginx", "bare", "broker")  # the column order wherever they appear
SWEEP_CONNS = (32, 64)  # the workers sweep's concurrencies; its verdict uses the last
CLK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
REAL_KEY = "sk-bench-" + os.urandom(12).hex()  # a stand-in key; the upstream insists on it
EMBED_BODY = b'{"model":"text-embedding-3-small","input":"The quick brown fox jumps."}'
CHAT_BODY = (b'{"model":"gpt-4o-mini","stream":true,'
             b'"messages":[{"role":"user","content":"Say hi, slowly."}]}')
# Percentiles asked of wrk and of our own samples: enough for a smooth distribution chart.
PCTS = (0, 1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97, 98, 99, 99.5, 99.7,
        99.9, 99.95, 99.99)  # not 100: wrk answers 0 for it (its max is in lat_us.max)
TARGETS = {
    "added_p50_ms": 0.35,
    "added_p99_ms": 2.0,
    "rps_c32": 3000.0,
    "chunk_added_p99_ms": 1.0,
    "open_streams_rss_mb": 150.0,
    "idle_rss_mb": 60.0,
    # Relative to the other paths of the same run, so that a slower machine moves both sides.
    "rps_c32_vs_bare": 1.0,  # broker req/s ÷ bare req/s at c=32
    "p50_c1_minus_bare_ms": 0.05,  # (broker - direct) - (bare - direct) at c=1, p50
    "open_chunk_added_vs_nginx": 2.0,  # open streams: chunk p99 over direct, broker ÷ nginx
    "ttfb_added_p99_ms": 2.0,  # time to first event, p99, broker - direct
    "workers_2_x": 1.6,  # broker req/s with --workers 2 ÷ --workers 1
    "workers_8_x": 6.0,  # the same for 8 (the target, on a 16-core machine)
}
ANALYSIS_BEGIN = "<!-- analysis:begin (hand-written; kept when the script rewrites the file) -->"
ANALYSIS_END = "<!-- analysis:end -->"
T_RE = re.compile(rb'"t":(\d+)')


# --- small helpers ----------------------------------------------------------------------------


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def cpu_secs(pids: list[int]) -> float:
    """utime+stime (all threads) of these processes, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = text[text.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK


def status_kb(pid: int, key: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_mb(pids: list[int], key: str = "VmRSS") -> float:
    return sum(status_kb(pid, key) for pid in pids) / 1024.0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def system_busy_secs() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy (all cores), and of those the seconds a
    hypervisor gave this VM's CPUs to someone else (steal), from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    steal = parts[7] if len(parts) > 7 else 0
    return (sum(parts[:8]) - idle) / CLK, steal / CLK


def self_cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


class Meter:
    """CPU of each process group, of this process, of waited-for children (wrk), and of the
    rest of the machine, over one measurement."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Meter:
        self._t = time.perf_counter()
        self._cpu = {name: cpu_secs(pids) for name, pids in self.groups.items()}
        self._self = self_cpu()
        self._busy = system_busy_secs()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        cpu = {name: cpu_secs(pids) - self._cpu[name] for name, pids in self.groups.items()}
        me, kids = self_cpu()
        gen = me - self._self[0]
        wrk = kids - self._self[1]
        busy_now, steal_now = system_busy_secs()
        busy, steal = busy_now - self._busy[0], steal_now - self._busy[1]
        others = max(0.0, busy - sum(cpu.values()) - gen - wrk)
        self.result = {"wall_s": wall, "cpu_s": cpu, "generator_cpu_s": gen, "wrk_cpu_s": wrk,
                       "machine_busy_s": busy, "others_cpu_s": others, "steal_s": steal}


# --- processes --------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def http_call(port: int, method: str, path: str, headers: dict[str, str],
              body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(what: str, check: Callable[[], bool], child: Child | None,
               timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.popen.poll() is not None:
            raise SystemExit(f"{what}: the process exited with {child.popen.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def start_upstream(tmp: Path) -> tuple[Child, int]:
    env = dict(os.environ, BENCH_UPSTREAM_KEY=REAL_KEY)
    err = (tmp / "upstream.log").open("wb")
    popen = subprocess.Popen([sys.executable, str(UPSTREAM_SCRIPT), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                             env=env)
    child = Child("upstream", popen)
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], 20)
    line = popen.stdout.readline().decode() if ready else ""
    if not line.startswith("READY "):
        child.stop()
        raise SystemExit(f"the stand-in upstream did not start: {line!r}")
    return child, int(line.split()[1])


def broker_env(home: Path) -> dict[str, str]:
    # As a service manager would start it: no SECRET_BROKER_* leaking in from this shell, and
    # no PYTHONUNBUFFERED (systemd does not set it; with it, each log line is two writes).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SECRET_BROKER_")
           and k not in ("CREDENTIALS_DIRECTORY", "PYTHONUNBUFFERED")}
    env["SECRET_BROKER_HOME"] = str(home)
    env["PYTHONPATH"] = str(SRC)
    return env


def cli(env: dict[str, str], *args: str, stdin: bytes | None = None,
        timeout: float = 120.0) -> str:
    proc = subprocess.run([sys.executable, "-m", "broker", *args], input=stdin,
                          capture_output=True, env=env, cwd=SRC, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"`secret-broker {' '.join(args)}` failed ({proc.returncode}):\n"
                         f"{proc.stdout.decode()}{proc.stderr.decode()}")
    return proc.stdout.decode()


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def setup_broker_home(tmp: Path, upstream_port: int) -> tuple[Path, dict[str, str]]:
    home = tmp / "h"
    env = broker_env(home)
    cli(env, "init", "--backend", "file-vault", stdin=b"")
    cli(env, "add", "@openai_api_key", "--provider", "openai", "--kind", "api_key", "--stdin",
        stdin=REAL_KEY.encode())
    write_private(home / "config.toml",
                  '[store]\nbackend = "file-vault"\n\n[audit]\nfsync = "batch"\n\n'
                  f'[providers.openai]\nbase_url = "http://{HOST}:{upstream_port}"\n')
    write_private(home / "secrets.grants.toml",
                  '[[grants]]\nsecret_ref = "openai_api_key"\nconsumer = "default"\n'
                  'purposes = ["llm.embeddings", "llm.chat"]\ndelivery = ["http_header_inject"]\n'
                  f'allowed_hosts = ["{HOST}:{upstream_port}"]\nttl_secs = 3600\n')
    return home, env


def broker_has_workers_flag(env: dict[str, str]) -> bool:
    """Whether this tree's `serve` takes --workers (older brokers are one process)."""
    return "--workers" in cli(env, "serve", "--help")


def start_broker(tmp: Path, home: Path, env: dict[str, str], nofile: int | None = None,
                 workers: int | None = None) -> tuple[Child, int, str]:
    """`serve` on a free port; `--workers N` only when asked, so that a broker without the
    flag still runs."""
    port = free_port()
    out = (tmp / "broker.log").open("ab")

    def limit() -> None:  # e.g. 1024: the soft limit systemd gives a service by default
        if nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    argv = [sys.executable, "-m", "broker", "serve", "--listen", f"{HOST}:{port}",
            "--log-format", "json"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=SRC,
        preexec_fn=limit if nofile else None)
    child = Child("broker", popen)
    token = ""

    def healthy() -> bool:
        nonlocal token
        if not token and (home / "broker.token").exists():
            token = (home / "broker.token").read_text().strip()
        status, _ = http_call(port, "GET", "/v1/health", {"Authorization": f"Bearer {token}"})
        return status == 200

    wait_until("the broker to answer /v1/health", healthy, child)
    return child, port, token


NGINX_CONF = """\
{user}worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    upstream bench_upstream {{
        server {host}:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location /proxy/openai/ {{
            proxy_pass http://bench_upstream/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {key}";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def start_nginx(binary: str, tmp: Path, upstream_port: int) -> tuple[Child, int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user="user root;\n" if os.geteuid() == 0 else "",
                                      tmp=tmp, host=HOST, port=port,
                                      upstream_port=upstream_port, key=REAL_KEY))
    conf.chmod(0o600)
    out = (tmp / "nginx.out").open("wb")
    popen = subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf)], stdout=out,
                             stderr=out, stdin=subprocess.DEVNULL)
    child = Child("nginx", popen)
    wait_until("nginx to answer", lambda: answers_post(port), child, timeout=15)
    return child, port


def answers_post(port: int) -> bool:
    """A key-swapping proxy (nginx, bare) passes an embeddings POST through."""
    status, _ = http_call(port, "POST", "/proxy/openai/v1/embeddings",
                          {"Content-Type": "application/json"}, EMBED_BODY)
    return status == 200


def start_bare(tmp: Path, upstream_port: int, processes: int = 1) -> tuple[Child, int]:
    """scripts/bench_bare_proxy.py, given the key in its environment (not on its command
    line); returns once all its processes are forked and one answers."""
    port = free_port()
    env = dict(os.environ, BENCH_UPSTREAM_KEY=REAL_KEY)
    out = (tmp / "bare.log").open("ab")
    popen = subprocess.Popen([sys.executable, str(BARE_SCRIPT), "--port", str(port),
                              "--upstream-port", str(upstream_port),
                              "--processes", str(processes)],
                             stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    child = Child("bare", popen)
    wait_until("the bare aiohttp proxy to answer", lambda: answers_post(port), child, timeout=15)
    if processes > 1:
        wait_until(f"the bare proxy's {processes} processes",
                   lambda: len(children_of(child.pid)) >= processes, child, timeout=10)
    return child, port


def process_tree(pid: int) -> list[int]:
    """A proxy's processes: the parent and its workers (nginx, --workers, --processes)."""
    return [pid, *children_of(pid)]


# --- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    prefix: str  # path prefix before /v1/...
    auth: str  # the Authorization value the caller sends
    pids: list[int] = field(default_factory=list)  # the proxy's processes (none for direct)

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{self.prefix}{path}"

    def stream_request(self, chunks: int, pause_ms: float) -> bytes:
        path = f"{self.prefix}/v1/chat/completions?chunks={chunks}&pause_ms={pause_ms:g}"
        return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Authorization: {self.auth}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(CHAT_BODY)}\r\n\r\n"
                ).encode() + CHAT_BODY


# --- wrk --------------------------------------------------------------------------------------

LUA = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "{auth}"
local pcts = {{{pcts}}}
done = function(summary, latency, requests)
  local out = {{}}
  for _, p in ipairs(pcts) do
    out[#out + 1] = string.format("[%g,%d]", p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"lat_us":{{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,"pcts":[%s]}}}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.min, latency.max, latency.mean, latency.stdev,
    table.concat(out, ",")))
end
"""


def write_lua(tmp: Path, target: Target) -> Path:
    path = tmp / f"post-{target.name}.lua"
    write_private(path, LUA.format(body=EMBED_BODY.decode(), auth=target.auth,
                                   pcts=", ".join(f"{p:g}" for p in PCTS)))
    return path


def run_wrk(wrk: str, target: Target, lua: Path, conns: int, seconds: float,
            threads: int = 1) -> dict[str, Any]:
    argv = [wrk, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(lua), target.url("/v1/embeddings")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            doc: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            doc["rps"] = doc["requests"] / (doc["duration_us"] / 1e6)
            doc["pcts_ms"] = [(p, v / 1000.0) for p, v in doc["lat_us"]["pcts"]]
            doc["error_count"] = sum(doc["errors"].values())
            return doc
    raise SystemExit(f"wrk gave no result ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def lat(doc: dict[str, Any], p: float) -> float:
    return float(dict(doc["pcts_ms"])[p])


# --- the streaming load generator -------------------------------------------------------------


@dataclass
class StreamResult:
    status: int = 0
    ttfb_ns: int = 0
    events: int = 0
    done: bool = False
    error: str | None = None
    delays_ns: list[int] = field(default_factory=list)


class SSEConn(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection that runs one SSE request at a time and stamps each
    event with the moment its bytes arrived (time.time_ns(), the upstream's clock)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.broken = False
        self._fut: asyncio.Future[StreamResult] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._finish(f"connection lost: {exc!r}" if exc else "connection closed")

    async def stream(self, request: bytes, on_headers: Callable[[], None] | None = None
                     ) -> StreamResult:
        assert self.transport is not None
        self._fut = asyncio.get_running_loop().create_future()
        self._res = StreamResult()
        self._state = 0  # 0 head, 1 chunk size, 2 chunk data, 3 last CRLF, 4 length body
        self._buf = bytearray()
        self._sse = bytearray()
        self._need = 0
        self._on_headers = on_headers
        self._t0 = time.time_ns()
        self.transport.write(request)
        return await self._fut

    def _finish(self, error: str | None = None) -> None:
        if self._fut is not None and not self._fut.done():
            if error is not None and self._res.error is None:
                self._res.error = error
            self._fut.set_result(self._res)
            if error is not None and self.transport is not None:
                self.broken = True
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self._fut is None or self._fut.done():
            return
        buf = self._buf
        buf += data
        while True:
            if self._state == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                self._res.status = int(lines[0].split()[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip().lower()
                if self._res.status != 200:
                    self._finish(f"status {self._res.status}")
                    return
                if self._on_headers is not None:
                    self._on_headers()
                if b"chunked" in headers.get(b"transfer-encoding", b""):
                    self._state = 1
                else:
                    self._state, self._need = 4, int(headers.get(b"content-length", b"0"))
            elif self._state == 1:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                self._state, self._need = (3, 0) if size == 0 else (2, size)
            elif self._state == 2:
                if len(buf) < self._need + 2:
                    return
                self._events(bytes(buf[: self._need]), now)
                del buf[: self._need + 2]
                self._state = 1
            elif self._state == 3:
                if buf.find(b"\r\n") < 0:
                    return
                self._finish()
                return
            else:
                take = min(len(buf), self._need)
                self._events(bytes(buf[:take]), now)
                del buf[:take]
                self._need -= take
                if self._need == 0:
                    self._finish()
                return

    def _events(self, data: bytes, now: int) -> None:
        sse = self._sse
        sse += data
        res = self._res
        while True:
            end = sse.find(b"\n\n")
            if end < 0:
                return
            event = bytes(sse[:end])
            del sse[: end + 2]
            if event.startswith(b"data: [DONE]"):
                res.done = True
                continue
            m = T_RE.search(event)
            if m is None:
                continue
            if res.events == 0:
                res.ttfb_ns = now - self._t0
            res.events += 1
            res.delays_ns.append(now - int(m.group(1)))


async def connect(port: int) -> SSEConn:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(SSEConn, HOST, port), 10)
    return proto


def summarize_streams(results: list[StreamResult], chunks: int) -> dict[str, Any]:
    delays = sorted(d / 1e6 for r in results for d in r.delays_ns)
    ttfb = sorted(r.ttfb_ns / 1e6 for r in results if r.events)
    errors: Counter[str] = Counter()
    for r in results:
        if r.error is not None:
            errors[r.error.split(":")[0]] += 1
        elif not r.done or r.events != chunks:
            errors["incomplete stream"] += 1
    return {"streams": len(results), "chunks": len(delays), "errors": sum(errors.values()),
            "error_kinds": dict(errors),
            "chunk_ms": {str(p): pct(delays, p) for p in PCTS},
            "ttfb_ms": {str(p): pct(ttfb, p) for p in PCTS}}


async def ttfb_phase(target: Target, count: int) -> dict[str, Any]:
    """Sequential short streams on one keep-alive connection: time to the first event."""
    conn = await connect(target.port)
    results = []
    request = target.stream_request(3, 0)
    for _ in range(count):
        if conn.broken:
            conn = await connect(target.port)
        results.append(await asyncio.wait_for(conn.stream(request), 30))
    if conn.transport is not None:
        conn.transport.close()
    return summarize_streams(results, 3)


async def chunk_phase(target: Target, concurrency: int, total: int, chunks: int,
                      pause_ms: float) -> dict[str, Any]:
    """`total` streams of `chunks` events, `concurrency` at a time: each chunk's delay."""
    request = target.stream_request(chunks, pause_ms)
    results: list[StreamResult] = []
    left = [total]
    timeout = chunks * pause_ms / 1000 + 30

    async def worker(i: int) -> None:
        await asyncio.sleep(i * pause_ms / 1000 / concurrency)  # spread the ticks apart
        conn = await connect(target.port)
        while left[0] > 0:
            left[0] -= 1
            if conn.broken:
                conn = await connect(target.port)
            try:
                results.append(await asyncio.wait_for(conn.stream(request), timeout))
            except TimeoutError:
                results.append(StreamResult(error="timeout"))
                conn.broken = True
        if conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return summarize_streams(results, chunks)


async def open_streams_phase(target: Target, n: int, chunks: int, pause_ms: float,
                             watch: list[int]) -> dict[str, Any]:
    """`n` streams opened at once (in batches of 100, 20 ms apart) and held for
    chunks x pause_ms: errors, how many were open together, and the RSS of `watch`."""
    request = target.stream_request(chunks, pause_ms)
    open_now = [0]
    peak_open = [0]
    rss_peak = [rss_mb(watch)]
    rss_before = rss_peak[0]
    results: list[StreamResult] = []
    timeout = chunks * pause_ms / 1000 + 60

    def opened() -> None:
        open_now[0] += 1
        peak_open[0] = max(peak_open[0], open_now[0])

    async def one() -> None:
        try:
            conn = await connect(target.port)
        except (OSError, TimeoutError) as exc:
            results.append(StreamResult(error=f"connect failed: {exc!r}"))
            return
        try:
            res = await asyncio.wait_for(conn.stream(request, opened), timeout)
        except TimeoutError:
            res = StreamResult(error="timeout")
        if res.status == 200:
            open_now[0] -= 1
        results.append(res)
        if conn.transport is not None:
            conn.transport.close()

    async def sample() -> None:
        while True:
            rss_peak[0] = max(rss_peak[0], rss_mb(watch))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    tasks = []
    for start in range(0, n, 100):
        tasks += [asyncio.create_task(one()) for _ in range(min(100, n - start))]
        await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    sampler.cancel()
    summary = summarize_streams(results, chunks)
    summary.update(peak_open=peak_open[0], rss_before_mb=rss_before, rss_peak_mb=rss_peak[0],
                   rss_after_mb=rss_mb(watch))
    return summary


# --- profiling --------------------------------------------------------------------------------


def find_pyspy() -> str | None:
    near = Path(sys.executable).with_name("py-spy")
    return str(near) if near.exists() else shutil.which("py-spy")


def start_pyspy(pyspy: str, pid: int, seconds: float, out: Path, rate: int) -> subprocess.Popen[
        bytes]:
    return subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--function", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


COMPONENTS = (
    # label, pattern on a frame "function (file)"; a sample counts once if any frame matches
    ("audit line: seal (JSON, HMAC, SHA-256), flock, fstat, write", r"^AuditLog\.append "),
    ("audit flush thread: fsync + SQLite checkpoint (every 100 ms)", r"^AuditLog\.flush "),
    ("request log line (structlog: processors, JSON, write)", r"\(structlog/"),
    ("upstream request (aiohttp client: build, send, read headers)",
     r"^ClientSession\._request "),
    ("reading the upstream answer (iter_any)", r"^AsyncStreamIterator\.__anext__ "),
    ("answer headers to caller (StreamResponse.prepare: own write)",
     r"^StreamResponse\.prepare "),
    ("answer body to caller (StreamResponse.write / write_eof)",
     r"^StreamResponse\.(write|write_eof) "),
    ("usage tap: json.loads of the whole answer", r"^usage_from_body "),
    ("secret version check (SQLite PRAGMA data_version)", r"^BrokerState\.secret_version "),
    ("token check (compare, consumer-token lookup)", r"^Authenticator\.authenticate "),
    ("route match (normalise + regex)", r"^match \(broker/routes"),
    ("upstream header filtering", r"^upstream_headers "),
    ("lease lookup", r"^Access\.acquire "),
    ("request body read", r"^_read_body "),
    ("URL build (yarl)", r"^URL\.__new__ |^URL\.build "),
    ("aiohttp server: parse + dispatch (outside the handler)",
     r"^RequestHandler\.(data_received|start) "),
)


def parse_profile(path: Path) -> dict[str, Any]:
    stacks: list[tuple[list[str], int]] = []
    total = 0
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {"samples": 0}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        stacks.append((frames, int(count)))
        total += int(count)
    if not total:
        return {"samples": 0}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
        for label, pattern in COMPONENTS:
            if any(re.search(pattern, f) for f in frames):
                components[label] += n

    def share(counter: Counter[str], k: int | None = None) -> list[tuple[str, float]]:
        return [(name, 100.0 * c / total) for name, c in counter.most_common(k)]

    ours = Counter({f: c for f, c in inclusive.items()
                    if re.search(r"\((broker|grants)/", f) and not re.match(
                        r"^(<module>|main|cmd_serve|serve|_run) ", f)})
    return {"samples": total, "self": share(own, 18), "components": share(components),
            "ours": share(ours, 18)}


# --- the chart --------------------------------------------------------------------------------

COLORS = {"direct": "#1f77b4", "nginx": "#2ca02c", "bare": "#ff7f0e", "broker": "#d62728"}


def _x(p: float) -> float:
    return math.log10(1.0 / (1.0 - min(p, 99.99) / 100.0))


def svg_chart(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], path: Path,
              caption: str) -> None:
    """Percentile curves (HdrHistogram style: x = 1/(1-p) on a log axis, y log ms)."""
    w, h, left, top, pw, ph, gap = 1240, 370, 70, 50, 330, 260, 80
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{caption}</text>']
    for i, (title, series) in enumerate(panels):
        x0 = left + i * (pw + gap)
        values = [v for pts in series.values() for _, v in pts if v > 0]
        if not values:
            continue
        lo = 10 ** math.floor(math.log10(min(values)))
        hi = 10 ** math.ceil(math.log10(max(values)))
        if hi <= lo:
            hi = lo * 10

        def sx(p: float, x0: float = x0) -> float:
            return x0 + _x(p) / 4.0 * pw

        def sy(v: float, lo: float = lo, hi: float = hi) -> float:
            v = max(v, lo)
            return top + ph - (math.log10(v) - math.log10(lo)) / (
                math.log10(hi) - math.log10(lo)) * ph

        out.append(f'<text x="{x0 + pw / 2}" y="{top - 6}" text-anchor="middle">{title}</text>')
        out.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" '
                   'stroke="#888"/>')
        for p in (0, 50, 90, 99, 99.9, 99.99):
            x = sx(p)
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" '
                       'stroke="#ddd"/>')
            out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle">'
                       f'{p:g}</text>')
        decade = lo
        while decade <= hi * 1.0001:
            y = sy(decade)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" '
                       'stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end">{decade:g}</text>')
            decade *= 10
        out.append(f'<text x="{x0 + pw / 2}" y="{top + ph + 32}" text-anchor="middle">'
                   'percentile</text>')
        out.append(f'<text x="{x0 - 50}" y="{top + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 - 50} {top + ph / 2})">ms (log)</text>')
        for j, (name, pts) in enumerate(series.items()):
            pts = [(p, v) for p, v in pts if p < 100 and not math.isnan(v)]
            line = " ".join(f"{sx(p):.1f},{sy(v):.1f}" for p, v in pts)
            out.append(f'<polyline points="{line}" fill="none" stroke="{COLORS[name]}" '
                       'stroke-width="2"/>')
            ly = top + ph - 10 - (len(series) - 1 - j) * 16
            lx = x0 + pw - 80
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" '
                       f'stroke="{COLORS[name]}" stroke-width="2"/>')
            out.append(f'<text x="{lx + 25}" y="{ly}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    warmup: float
    ttfb_count: int
    stream_chunks: int
    stream_pause_ms: float
    stream_concurrency: int
    stream_total: int
    open_streams: int
    open_chunks: int
    open_pause_ms: float
    profile_secs: float
    nginx: bool
    profile: bool
    docs: bool
    keep: bool
    json_out: Path | None
    quick: bool
    wait_quiet: float
    report: Path | None
    phases: tuple[str, ...]
    src: Path
    broker_nofile: int | None
    nice: int
    workers: tuple[int, ...] = ()  # --workers: the sweep's N values (none: no sweep)


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = subprocess.run(
        [sys.executable, "-c",
         "import sys, aiohttp, structlog\n"
         "try:\n import uvloop; u = uvloop.__version__\nexcept ImportError:\n u = 'absent'\n"
         "print(sys.version.split()[0], aiohttp.__version__, u, structlog.__version__)"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    nginx = find_nginx()
    nginx_v = ""
    if nginx:
        proc = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        nginx_v = (proc.stderr or proc.stdout).strip().split("/")[-1]
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                           check=False).stdout.split("\n")[0].split(" [")[0]
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=SRC, check=False).stdout.strip() or str(SRC)
    dirty = subprocess.run(["git", "status", "--porcelain", "broker", "grants"],
                           capture_output=True, text=True, cwd=SRC, check=False).stdout.strip()
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "mem_mb": str(mem), "python": versions[0], "aiohttp": versions[1],
            "uvloop": versions[2], "structlog": versions[3], "nginx": nginx_v or "absent",
            "wrk": wrk_v, "commit": commit + (" + uncommitted changes in broker/, grants/"
                                              if dirty else ""),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def sanity(targets: list[Target]) -> None:
    """Each path answers the POST with the upstream's body and streams a whole short stream."""
    for t in targets:
        status, body = http_call(t.port, "POST", f"{t.prefix}/v1/embeddings",
                                 {"Authorization": t.auth, "Content-Type": "application/json"},
                                 EMBED_BODY)
        if status != 200 or not body.startswith(b'{"object":"list"'):
            raise SystemExit(f"{t.name}: POST answered {status}: {body[:200]!r}")


async def stream_sanity(targets: list[Target]) -> None:
    for t in targets:
        conn = await connect(t.port)
        res = await asyncio.wait_for(conn.stream(t.stream_request(5, 1)), 10)
        if res.error or not res.done or res.events != 5:
            raise SystemExit(f"{t.name}: a 5-chunk stream came back as {res}")
        if conn.transport is not None:
            conn.transport.close()


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def run(opts: Options) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    raise_nofile(4 * opts.open_streams + 1024)
    try:  # inherited by every process started below
        os.setpriority(os.PRIO_PROCESS, 0, opts.nice)
    except PermissionError:
        log(f"cannot set niceness {opts.nice} (not root?): running at the default")
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    results: dict[str, Any] = {"machine": machine_info(), "niceness": niceness, "options": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}}
    log(f"machine: {results['machine']['nproc']} cpus, {results['machine']['cpu']}")
    deadline = time.monotonic() + opts.wait_quiet
    while True:
        with Meter({}) as pre:
            time.sleep(1.0)
        results["background_before"] = pre.result["others_cpu_s"] / pre.result["wall_s"]
        if results["background_before"] <= 0.2 or time.monotonic() >= deadline:
            break
        log(f"waiting for a quieter machine: others use {results['background_before']:.0%}"
            " of a core")
    if results["background_before"] > 0.2:
        log(f"warning: other processes keep {results['background_before']:.0%} of a core busy;"
            " the numbers will be noisy")
    tmp = Path(tempfile.mkdtemp(prefix="sb-bench-", dir="/tmp"))
    children: list[Child] = []
    try:
        upstream, up_port = start_upstream(tmp)
        children.append(upstream)
        log(f"upstream on :{up_port} (pid {upstream.pid}); setting up the broker home")
        home, env = setup_broker_home(tmp, up_port)
        workers_flag = bool(opts.workers) and broker_has_workers_flag(env)
        if opts.workers and not workers_flag:
            if set(opts.workers) != {1}:
                raise SystemExit(f"--workers {','.join(map(str, opts.workers))}: this broker "
                                 f"has no --workers flag (`python -m broker serve --help` in "
                                 f"{SRC} does not list it); only --workers 1 runs without it")
            log("this broker has no --workers flag: the sweep's N=1 runs it without the flag")
        broker, b_port, token = start_broker(tmp, home, env, opts.broker_nofile)
        children.append(broker)
        targets = [Target("direct", up_port, "", f"Bearer {REAL_KEY}")]
        nginx_bin = find_nginx() if opts.nginx else None
        if nginx_bin:
            nginx, n_port = start_nginx(nginx_bin, tmp, up_port)
            children.append(nginx)
            targets.append(Target("nginx", n_port, "/proxy/openai", "Bearer sbt_not_checked",
                                  process_tree(nginx.pid)))
        else:
            log("nginx not found (or --no-nginx): that column is left out")
        bare, bare_port = start_bare(tmp, up_port)
        children.append(bare)
        targets.append(Target("bare", bare_port, "/proxy/openai", "Bearer sbt_not_checked",
                              [bare.pid]))
        targets.append(Target("broker", b_port, "/proxy/openai", f"Bearer {token}",
                              [broker.pid]))
        log(f"broker on :{b_port} (pid {broker.pid}); paths: {[t.name for t in targets]}")
        sanity(targets)
        loop_factory = _loop_factory()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(stream_sanity(targets))
        groups = {t.name: t.pids for t in targets if t.pids} | {"upstream": [upstream.pid]}

        # 4a. idle: RSS after start and a short sanity, and what the idle daemon burns.
        time.sleep(1.0)
        with Meter(groups) as idle:
            time.sleep(3.0)
        results["idle"] = {
            "rss_mb": {t.name: rss_mb(t.pids) for t in targets if t.pids},
            "cpu_ms_per_s": {n: 1000 * c / idle.result["wall_s"]
                             for n, c in idle.result["cpu_s"].items()},
        }
        log(f"idle RSS: {results['idle']['rss_mb']}")

        # 1. non-streaming POST.
        luas = {t.name: write_lua(tmp, t) for t in targets}
        for conns in (1, 32) if "post" in opts.phases else ():
            key = f"post_c{conns}"
            results[key] = {}
            for t in targets:
                if opts.warmup:
                    run_wrk(wrk, t, luas[t.name], conns, opts.warmup)
                with Meter(groups) as m:
                    doc = run_wrk(wrk, t, luas[t.name], conns, opts.duration)
                doc["meter"] = m.result
                doc["cpu_ms_per_1000"] = {
                    n: 1e6 * c / max(1, doc["requests"]) for n, c in m.result["cpu_s"].items()}
                results[key][t.name] = doc
                log(f"POST c={conns} {t.name}: {doc['rps']:.0f} req/s, p50 {lat(doc, 50):.3f} ms"
                    f", p99 {lat(doc, 99):.3f} ms, errors {doc['error_count']}")

        # Syscalls per request (strace -c), where strace is installed; before the streams,
        # whose idle upstream connections would be closed (and counted) during it.
        strace = shutil.which("strace") if opts.profile and "profile" in opts.phases else None
        if strace:
            results["syscalls"] = {}
            for t in targets:
                watch = t.pids if t.pids else [upstream.pid]
                if t.name == "nginx":
                    watch = children_of(t.pids[0]) or t.pids
                results["syscalls"][t.name] = count_syscalls(strace, wrk, t, watch,
                                                             luas[t.name], 2.0)
            log("syscalls per request: " + ", ".join(
                f"{n} {d['total']:.1f}" for n, d in results["syscalls"].items()))

        # 2 and 3. streams, with this process as the load generator.
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if "streams" in opts.phases:
                results["ttfb"], results["chunks"] = {}, {}
            if "open" in opts.phases:
                results["open"] = {}
            for t in targets if "streams" in opts.phases else ():
                with Meter(groups) as m:
                    doc = runner.run(ttfb_phase(t, opts.ttfb_count))
                doc["meter"] = m.result
                results["ttfb"][t.name] = doc
                log(f"TTFB {t.name}: p50 {doc['ttfb_ms']['50']:.3f} ms, "
                    f"p99 {doc['ttfb_ms']['99']:.3f} ms, errors {doc['errors']}")
            for t in targets if "streams" in opts.phases else ():
                with Meter(groups) as m:
                    doc = runner.run(chunk_phase(t, opts.stream_concurrency, opts.stream_total,
                                                 opts.stream_chunks, opts.stream_pause_ms))
                doc["meter"] = m.result
                results["chunks"][t.name] = doc
                log(f"chunks {t.name}: p50 {doc['chunk_ms']['50']:.3f} ms, "
                    f"p99 {doc['chunk_ms']['99']:.3f} ms over {doc['chunks']} chunks, "
                    f"errors {doc['errors']}, generator CPU "
                    f"{m.result['generator_cpu_s'] / m.result['wall_s']:.0%}")
            for t in targets if "open" in opts.phases else ():
                with Meter(groups) as m:
                    doc = runner.run(open_streams_phase(
                        t, opts.open_streams, opts.open_chunks, opts.open_pause_ms,
                        t.pids or [upstream.pid]))
                doc["meter"] = m.result
                results["open"][t.name] = doc
                log(f"{opts.open_streams} open streams {t.name}: peak open {doc['peak_open']}, "
                    f"errors {doc['errors']} {doc['error_kinds'] or ''}, RSS peak "
                    f"{doc['rss_peak_mb']:.1f} MB")
                time.sleep(0.5)

        # 4b. idle again after all that.
        time.sleep(1.5)
        results["idle_after"] = {"rss_mb": {t.name: rss_mb(t.pids) for t in targets if t.pids},
                                 "broker_hwm_mb": rss_mb([broker.pid], "VmHWM")}

        # Profile the broker under load.
        profiling = opts.profile and "profile" in opts.phases
        pyspy = find_pyspy() if profiling else None
        if profiling and pyspy is None:
            log("py-spy not found (pip install py-spy): no profile")
        if pyspy:
            results["profile"] = profile_broker(pyspy, wrk, tmp, targets[-1], luas["broker"],
                                                opts, loop_factory)

        if opts.workers:
            broker.stop()  # one broker per home at a time (its pid file)
            results["workers"] = workers_sweep(wrk, tmp, home, env, up_port, children, opts,
                                               workers_flag)

        # The audit trail written under all that load must still verify.
        started = time.perf_counter()
        verdict = cli(env, "audit", "verify", timeout=300).strip()
        results["audit_verify"] = {"output": verdict,
                                   "secs": time.perf_counter() - started}
        log(f"audit verify: {verdict}")
    finally:
        for child in reversed(children):
            child.stop()
        if opts.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["targets_present"] = [t.name for t in targets]
    return results


def profile_broker(pyspy: str, wrk: str, tmp: Path, broker: Target, lua: Path, opts: Options,
                   loop_factory: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": 250, "secs": opts.profile_secs}
    post_raw = tmp / "profile-post.txt"
    spy = start_pyspy(pyspy, broker.pids[0], opts.profile_secs, post_raw, 250)
    time.sleep(0.5)
    load = run_wrk(wrk, broker, lua, 32, opts.profile_secs + 1)
    spy.wait(timeout=60)
    out["post"] = parse_profile(post_raw) | {"rps_while_sampled": load["rps"]}
    if spy.returncode != 0 and spy.stderr is not None:
        out["post"]["error"] = spy.stderr.read().decode()[-300:]
    log(f"profile (POST c=32): {out['post'].get('samples', 0)} samples")

    stream_raw = tmp / "profile-stream.txt"
    spy = start_pyspy(pyspy, broker.pids[0], opts.profile_secs, stream_raw, 250)
    time.sleep(0.5)
    pause = 2.0
    chunks = max(10, round((opts.profile_secs + 1) * 1000 / pause))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(chunk_phase(broker, 64, 64, chunks, pause))
    spy.wait(timeout=60)
    out["stream"] = parse_profile(stream_raw) | {"load": f"64 streams x 1 chunk / {pause:g} ms"}
    log(f"profile (streams): {out['stream'].get('samples', 0)} samples")
    return out


def workers_sweep(wrk: str, tmp: Path, home: Path, env: dict[str, str], up_port: int,
                  children: list[Child], opts: Options, flag: bool) -> dict[str, Any]:
    """For each N of --workers: the broker with `--workers N` (without the flag where this
    broker lacks it: then N is 1) and the bare proxy with `--processes N`, POST throughput
    at each of SWEEP_CONNS. The direct path at the same load is the ceiling: the upstream is
    one process, so past it more workers cannot show."""
    # More than one wrk thread where there are cores for it, so that wrk is not the limit.
    threads = max(1, min(4, (os.cpu_count() or 1) // 4))
    out: dict[str, Any] = {"conns": list(SWEEP_CONNS), "wrk_threads": threads,
                           "flag": flag, "direct": {}, "runs": []}

    def measure(t: Target, lua: Path, conns: int) -> dict[str, Any]:
        if opts.warmup:
            run_wrk(wrk, t, lua, conns, opts.warmup, threads)
        groups = {t.name: process_tree(t.pids[0])} if t.pids else {}
        with Meter(groups) as m:
            doc = run_wrk(wrk, t, lua, conns, opts.duration, threads)
        cpu = sum(m.result["cpu_s"].values())
        return {"rps": doc["rps"], "p50_ms": lat(doc, 50), "p99_ms": lat(doc, 99),
                "errors": doc["error_count"], "processes": len(groups.get(t.name, [])),
                "cpu_ms_per_1000": 1e6 * cpu / max(1, doc["requests"]) if t.pids else None}

    direct = Target("direct", up_port, "", f"Bearer {REAL_KEY}")
    lua = write_lua(tmp, direct)
    for conns in SWEEP_CONNS:
        out["direct"][str(conns)] = measure(direct, lua, conns)
        log(f"workers sweep, direct c={conns}: {out['direct'][str(conns)]['rps']:.0f} req/s")
    for n in opts.workers:
        try:
            broker, b_port, token = start_broker(tmp, home, env, opts.broker_nofile,
                                                 n if flag else None)
        except SystemExit as exc:
            tail = (tmp / "broker.log").read_text(errors="replace").splitlines()[-6:]
            raise SystemExit(f"the broker with --workers {n} did not start: {exc}\n"
                             "broker.log ends:\n" + "\n".join(tail)) from None
        children.append(broker)
        bare, bare_port = start_bare(tmp, up_port, n)
        children.append(bare)
        try:
            targets = [Target("bare", bare_port, "/proxy/openai", "Bearer sbt_not_checked",
                              [bare.pid]),
                       Target("broker", b_port, "/proxy/openai", f"Bearer {token}",
                              [broker.pid])]
            sanity(targets)
            run: dict[str, Any] = {"n": n}
            for t in targets:
                lua = write_lua(tmp, t)
                run[t.name] = {str(c): measure(t, lua, c) for c in SWEEP_CONNS}
            out["runs"].append(run)
            log(f"workers sweep, N={n}: " + ", ".join(
                f"{name} c={c} {run[name][str(c)]['rps']:.0f} req/s "
                f"({run[name][str(c)]['processes']} processes)"
                for name in ("bare", "broker") for c in SWEEP_CONNS))
        finally:
            bare.stop()
            broker.stop()
    return out


def count_syscalls(strace: str, wrk: str, target: Target, pids: list[int], lua: Path,
                   seconds: float) -> dict[str, Any]:
    """strace -c on the process(es) while wrk sends requests at concurrency 1: syscalls per
    request, by name (strace slows the traced process: this is not a timed run)."""
    out = Path(lua).with_name(f"strace-{target.name}.txt")
    argv = [strace, "-f", "-c", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    doc = run_wrk(wrk, target, lua, 1, seconds)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in out.read_text().splitlines():
            cols = line.split()
            if len(cols) < 5 or not cols[0][0].isdigit() or cols[-1] == "total":
                continue
            calls[cols[-1]] = int(cols[3])
    n = max(1, doc["requests"])
    per = {name: c / n for name, c in sorted(calls.items(), key=lambda kv: -kv[1])}
    return {"requests": doc["requests"], "per_request": per, "total": sum(per.values())}


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# --- the report -------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    """None: the target cannot be judged in this run (the path it compares with is absent)."""
    return "n/a" if ok is None else "met" if ok else "**missed**"


def columns(r: dict[str, Any]) -> list[str]:
    return [n for n in PATHS if n in r["targets_present"]]


def summary_rows(r: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    names = r["targets_present"]
    cols = columns(r)
    rows: list[list[str]] = []
    checks: list[dict[str, Any]] = []

    def row(label: str, values: dict[str, float], fmt: str, delta: str, target: str,
            status: str) -> None:
        cells = [label] + [fmt.format(values[n]) if n in values else "n/a" for n in cols]
        rows.append([*cells, delta, target, status])

    def judged(label: str, what: str, actual: str, target: str, ok: bool | None,
               by: str = "") -> None:
        """A target computed from other rows: a row of its own (the figure in the delta
        column) and a check."""
        rows.append([label, *["" for _ in cols], actual, target, verdict(ok)])
        checks.append({"what": what, "target": target, "actual": actual, "ok": ok,
                       "by": by if ok is False else ""})

    if "post_c1" in r:
        c1, c32 = r["post_c1"], r["post_c32"]
        for p, key in ((50, "added_p50_ms"), (99, "added_p99_ms")):
            values = {n: lat(c1[n], p) for n in names}
            added = values["broker"] - values["direct"]
            ok = added <= TARGETS[key]
            checks.append({"what": f"added latency at concurrency 1, p{p}", "target":
                           f"≤ {TARGETS[key]:g} ms", "actual": f"{added:.3f} ms", "ok": ok,
                           "by": f"{added - TARGETS[key]:.3f} ms over" if not ok else ""})
            row(f"POST latency, c=1, p{p} (ms)", values, "{:.3f}", f"{added:+.3f} ms",
                f"+≤ {TARGETS[key]:g} ms", verdict(ok))
        limit = TARGETS["p50_c1_minus_bare_ms"]
        what = "added p50 at concurrency 1, broker - bare"
        if "bare" in names:
            base = lat(c1["direct"], 50)
            b_add, bare_add = lat(c1["broker"], 50) - base, lat(c1["bare"], 50) - base
            diff = b_add - bare_add
            judged("POST added p50, c=1: broker - bare", what,
                   f"{diff:+.3f} ms (broker {b_add:+.3f}, bare {bare_add:+.3f})",
                   f"≤ {limit:g} ms", diff <= limit, f"{diff - limit:.3f} ms over")
        else:
            judged("POST added p50, c=1: broker - bare", what, "n/a (no bare)",
                   f"≤ {limit:g} ms", None)
        values = {n: c32[n]["rps"] for n in names}
        ok = values["broker"] >= TARGETS["rps_c32"]
        checks.append({"what": "throughput at concurrency 32",
                       "target": f"≥ {TARGETS['rps_c32']:,.0f} req/s",
                       "actual": f"{values['broker']:,.0f} req/s",
                       "ok": ok, "by": "" if ok else
                       f"{TARGETS['rps_c32'] - values['broker']:,.0f} req/s short "
                       f"({values['broker'] / TARGETS['rps_c32']:.0%} of target)"})
        row("POST throughput, c=32 (req/s)", values, "{:,.0f}",
            f"x{values['broker'] / values['direct']:.2f}", f"≥ {TARGETS['rps_c32']:,.0f}",
            verdict(ok))
        want = TARGETS["rps_c32_vs_bare"]
        if "bare" in values:
            ratio = values["broker"] / values["bare"]
            judged("POST throughput, c=32: broker ÷ bare", "throughput at concurrency 32, "
                   "broker ÷ bare", f"x{ratio:.2f}", f"≥ {want:.1f}x", ratio >= want,
                   f"{1 - ratio / want:.0%} short")
        else:
            judged("POST throughput, c=32: broker ÷ bare", "throughput at concurrency 32, "
                   "broker ÷ bare", "n/a (no bare)", f"≥ {want:.1f}x", None)
        for p in (50, 99):
            values = {n: lat(c32[n], p) for n in names}
            row(f"POST latency, c=32, p{p} (ms)", values, "{:.2f}",
                f"{values['broker'] - values['direct']:+.2f} ms", "", "")
        errors = {n: c1[n]["error_count"] + c32[n]["error_count"] for n in names}
        row("POST errors (all runs)", errors, "{:.0f}", "", "0", verdict(errors["broker"] == 0))
        cpu = {n: c32[n]["cpu_ms_per_1000"][n] for n in names if n in c32[n]["cpu_ms_per_1000"]}
        cpu["direct"] = c32["direct"]["cpu_ms_per_1000"]["upstream"]
        row("CPU per 1,000 POSTs, c=32 (ms; direct = the upstream's)", cpu, "{:.0f}", "", "", "")
        cpu1 = {n: c1[n]["cpu_ms_per_1000"][n] for n in names if n in c1[n]["cpu_ms_per_1000"]}
        cpu1["direct"] = c1["direct"]["cpu_ms_per_1000"]["upstream"]
        row("CPU per 1,000 POSTs, c=1 (ms)", cpu1, "{:.0f}", "", "", "")

    if "chunks" in r:
        for p in (50, 99):
            values = {n: float(r["ttfb"][n]["ttfb_ms"][str(p)]) for n in names}
            added = values["broker"] - values["direct"]
            target, status = "", ""
            if p == 99:
                limit = TARGETS["ttfb_added_p99_ms"]
                ok = added <= limit
                target, status = f"+≤ {limit:g} ms", verdict(ok)
                checks.append({"what": "stream time to first event, p99, added over direct",
                               "target": target, "actual": f"{added:+.3f} ms", "ok": ok,
                               "by": "" if ok else f"{added - limit:.3f} ms over"})
            row(f"stream time to first event, p{p} (ms)", values, "{:.3f}", f"{added:+.3f} ms",
                target, status)
        for p in (50, 99):
            values = {n: float(r["chunks"][n]["chunk_ms"][str(p)]) for n in names}
            added = values["broker"] - values["direct"]
            target, status = "", ""
            if p == 99:
                ok = added <= TARGETS["chunk_added_p99_ms"]
                target, status = f"+≤ {TARGETS['chunk_added_p99_ms']:g} ms", verdict(ok)
                checks.append({"what": "per-chunk delay through the broker, p99", "target": target,
                               "actual": f"{added:+.3f} ms", "ok": ok,
                               "by": "" if ok else
                               f"{added - TARGETS['chunk_added_p99_ms']:.3f} ms over"})
            row(f"stream chunk delay, p{p} (ms)", values, "{:.3f}", f"{added:+.3f} ms", target,
                status)
        cpu_chunk = {n: 1e6 * r["chunks"][n]["meter"]["cpu_s"][n] / max(1, r["chunks"][n]["chunks"])
                     for n in names if n in r["chunks"][n]["meter"]["cpu_s"]}
        cpu_chunk["direct"] = 1e6 * r["chunks"]["direct"]["meter"]["cpu_s"]["upstream"] / max(
            1, r["chunks"]["direct"]["chunks"])
        row("CPU per 1,000 stream chunks (ms; direct = the upstream's)", cpu_chunk, "{:.1f}", "",
            "", "")
    if "open" in r:
        n_open = r["options"]["open_streams"]
        values = {n: float(r["open"][n]["chunk_ms"]["99"]) for n in names}
        row(f"{n_open:,} open streams: chunk delay p99 (ms)", values, "{:.3f}",
            f"{values['broker'] - values['direct']:+.3f} ms", "", "")
        want = TARGETS["open_chunk_added_vs_nginx"]
        label = f"{n_open:,} open streams: chunk delay p99 added, broker ÷ nginx"
        what = f"{n_open:,} open streams: per-chunk delay p99 added over direct, broker ÷ nginx"
        if "nginx" in values:
            b_add = values["broker"] - values["direct"]
            n_add = values["nginx"] - values["direct"]
            # Literally "≤ 2x nginx's added delay": where nginx adds nothing, neither may we.
            ok = b_add <= want * max(n_add, 0.0)
            times = f"x{b_add / n_add:.2f}" if n_add > 0 else "no ratio (nginx adds ≤ 0)"
            judged(label, what, f"{times} (broker {b_add:+.3f} ms, nginx {n_add:+.3f} ms)",
                   f"≤ {want:.1f}x", ok, f"{b_add - want * max(n_add, 0.0):.3f} ms over")
        else:
            judged(label, what, "n/a (no nginx)", f"≤ {want:.1f}x", None)
        errs = {n: float(r["open"][n]["errors"]) for n in names}
        peak = {n: float(r["open"][n]["peak_open"]) for n in names}
        row(f"{n_open:,} open streams: most open at once", peak, "{:.0f}", "", f"{n_open:,}", "")
        rss = {n: r["open"][n]["rss_peak_mb"] for n in names if n != "direct"}
        ok = errs["broker"] == 0 and rss["broker"] <= TARGETS["open_streams_rss_mb"] and \
            peak["broker"] >= n_open
        checks.append({"what": f"{n_open:,} concurrent streams", "target":
                       f"0 errors, RSS ≤ {TARGETS['open_streams_rss_mb']:g} MB",
                       "actual": f"{errs['broker']:.0f} errors, {peak['broker']:.0f} open at once, "
                                 f"RSS {rss['broker']:.1f} MB", "ok": ok,
                       "by": "" if ok else _open_miss(errs["broker"], rss["broker"], peak["broker"],
                                                      n_open)})
        row(f"{n_open:,} open streams: errors", errs, "{:.0f}", "", "0",
            verdict(errs["broker"] == 0))
        row(f"{n_open:,} open streams: peak RSS (MB)", rss, "{:.1f}", "",
            f"≤ {TARGETS['open_streams_rss_mb']:g}",
            verdict(rss["broker"] <= TARGETS["open_streams_rss_mb"]))
    idle = r["idle"]["rss_mb"]
    ok = idle["broker"] <= TARGETS["idle_rss_mb"]
    checks.append({"what": "idle RSS", "target": f"≤ {TARGETS['idle_rss_mb']:g} MB",
                   "actual": f"{idle['broker']:.1f} MB", "ok": ok,
                   "by": "" if ok else f"{idle['broker'] - TARGETS['idle_rss_mb']:.1f} MB over"})
    row("idle RSS at start (MB)", idle, "{:.1f}", "", f"≤ {TARGETS['idle_rss_mb']:g}",
        verdict(ok))
    row("idle RSS after the run (MB)", r["idle_after"]["rss_mb"], "{:.1f}", "", "", "")
    idle_cpu = {n: v for n, v in r["idle"]["cpu_ms_per_s"].items() if n in names}
    row("idle CPU (ms per s)", idle_cpu, "{:.1f}", "", "", "")
    if r.get("syscalls"):
        calls = {n: d["total"] for n, d in r["syscalls"].items()}
        row("syscalls per POST, c=1 (strace -c; direct = the upstream's)", calls, "{:.1f}",
            "", "", "")
    if r.get("workers"):
        for n, key in ((2, "workers_2_x"), (8, "workers_8_x")):
            if any(run["n"] == n for run in r["workers"]["runs"]):
                x, bare_x, c = sweep_ratio(r["workers"], n)
                label = f"workers sweep: broker req/s, N={n} ÷ N=1 (c={c})"
                actual = "n/a (no N=1 in the sweep)" if x is None else \
                    f"x{x:.2f} (bare x{bare_x:.2f})" if bare_x is not None else f"x{x:.2f}"
                judged(label, f"broker throughput with --workers {n} ÷ --workers 1, c={c}",
                       actual, f"≥ {TARGETS[key]:.1f}x",
                       None if x is None else x >= TARGETS[key],
                       "" if x is None else f"{1 - x / TARGETS[key]:.0%} short")
    return rows, checks


def sweep_ratio(sw: dict[str, Any], n: int, conns: int | None = None
                ) -> tuple[float | None, float | None, int]:
    """Broker (and bare) req/s at N ÷ at N=1, at `conns` (default: the sweep's highest
    concurrency: N workers need enough connections between them to all be busy)."""
    c = conns or sw["conns"][-1]
    runs = {run["n"]: run for run in sw["runs"]}
    if 1 not in runs or n not in runs:
        return None, None, c

    def x(name: str) -> float | None:
        one, this = runs[1].get(name, {}).get(str(c)), runs[n].get(name, {}).get(str(c))
        return this["rps"] / one["rps"] if one and this and one["rps"] else None

    return x("broker"), x("bare"), c


def sweep_table(r: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The workers sweep: one row per N and concurrency."""
    sw = r["workers"]
    header = ["N", "concurrency", "broker req/s", "broker x(N=1)", "bare req/s", "bare x(N=1)",
              "broker ÷ bare", "broker p99 (ms)", "errors (broker, bare)",
              "processes (broker, bare)"]
    rows = []
    for run in sw["runs"]:
        for c in sw["conns"]:
            b, bare = run["broker"][str(c)], run["bare"][str(c)]
            bx, barex, _ = sweep_ratio(sw, run["n"], c)
            rows.append([str(run["n"]), str(c), f"{b['rps']:,.0f}",
                         "n/a" if bx is None else f"x{bx:.2f}", f"{bare['rps']:,.0f}",
                         "n/a" if barex is None else f"x{barex:.2f}",
                         f"x{b['rps'] / bare['rps']:.2f}", f"{b['p99_ms']:.2f}",
                         f"{b['errors']}, {bare['errors']}",
                         f"{b['processes']}, {bare['processes']}"])
    return header, rows


def sweep_note(r: dict[str, Any]) -> str:
    sw = r["workers"]
    ceiling = ", ".join(f"{d['rps']:,.0f} req/s at c={c}" for c, d in sw["direct"].items())
    flag = "" if sw["flag"] else (" This broker has no --workers flag: its N=1 row ran without "
                                  "it.")
    return (f"Each N: the broker restarted with `serve --workers N`, the bare proxy with "
            f"`--processes N`; wrk with {sw['wrk_threads']} thread(s), "
            f"{r['options']['duration']:g} s per run after {r['options']['warmup']:g} s of "
            f"warm-up. The direct path at the same load (the ceiling: the upstream is one "
            f"process): {ceiling}. The verdicts use c={sw['conns'][-1]}. *processes*: the parent "
            f"and its workers, counted as each run began.{flag}")


def _open_miss(errors: float, rss: float, peak: float, n: int) -> str:
    parts = []
    if errors:
        parts.append(f"{errors:.0f} errors")
    if peak < n:
        parts.append(f"only {peak:.0f} of {n} open at once")
    if rss > TARGETS["open_streams_rss_mb"]:
        parts.append(f"RSS {rss - TARGETS['open_streams_rss_mb']:.1f} MB over")
    return ", ".join(parts)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    clean = [[c.replace("**", "") for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in clean) for i in range(len(header))]
    out = []
    for k, r in enumerate(clean):
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def header_cells(r: dict[str, Any]) -> list[str]:
    return ["measure", *columns(r), "broker vs direct", "target", "verdict"]


def load_shares(r: dict[str, Any]) -> list[float]:
    """Share of a core that other processes used during each measured phase."""
    shares = []
    for phase in ("post_c1", "post_c32", "ttfb", "chunks", "open"):
        for doc in r.get(phase, {}).values():
            m = doc["meter"]
            shares.append(m["others_cpu_s"] / max(1e-9, m["wall_s"]))
    return shares


def load_note(r: dict[str, Any]) -> str:
    shares = load_shares(r)
    text = f"before the run, other processes kept {r['background_before']:.0%} of a core busy"
    if shares:
        text += (f"; during the measured phases {min(shares):.0%} to {max(shares):.0%} "
                 f"(mean {sum(shares) / len(shares):.0%})")
    steal = [doc["meter"]["steal_s"] / max(1e-9, doc["meter"]["wall_s"])
             for phase in ("post_c1", "post_c32", "ttfb", "chunks", "open")
             for doc in r.get(phase, {}).values() if "steal_s" in doc["meter"]]
    if steal:
        text += (f", of which CPU steal (the hypervisor running other guests on this VM's "
                 f"CPUs) was {min(steal):.0%} to {max(steal):.0%} (mean "
                 f"{sum(steal) / len(steal):.0%})")
    return text


def profile_section(r: dict[str, Any]) -> str:
    prof = r.get("profile")
    if not prof:
        return ("No profile in this run (py-spy absent or --no-profile). "
                "`pip install py-spy` into the venv and run again.\n")
    out = []
    for key, title in (("post", "non-streaming POST at concurrency 32 (wrk)"),
                       ("stream", "streams: " + prof["stream"].get("load", ""))):
        p = prof[key]
        if not p.get("samples"):
            out.append(f"### {title}\n\nno samples ({p.get('error', 'py-spy failed')})\n")
            continue
        busy = p["samples"] / (prof["rate"] * prof["secs"])
        extra = f", {p['rps_while_sampled']:,.0f} req/s while sampled" \
            if "rps_while_sampled" in p else ""
        out.append(f"### {title}\n\npy-spy, {prof['rate']} Hz for {prof['secs']:g} s: "
                   f"{p['samples']:,} samples of a running thread (≈ {busy:.0%} of one core, "
                   f"all threads{extra}). % = share of those samples.\n")
        out.append("Where the time goes, by component (a sample counts for each component "
                   "on its stack; components nest, so the column does not add up to 100 %):\n")
        out.append(table(["component", "% of samples"],
                         [[label, f"{share:.1f}"] for label, share in p["components"]]))
        out.append("\nHottest functions by own time (the innermost Python frame; time in C "
                   "called from it, e.g. a syscall, counts here):\n")
        out.append(table(["function (file)", "% own"],
                         [[f"`{f}`", f"{s:.1f}"] for f, s in p["self"]]))
        out.append("\nbroker/ and grants/ functions, inclusive (the function and all it "
                   "calls):\n")
        out.append(table(["function (file)", "% inclusive"],
                         [[f"`{f}`", f"{s:.1f}"] for f, s in p["ours"]]))
        out.append("")
    return "\n".join(out) + "\n"


def syscall_section(r: dict[str, Any]) -> str:
    sc = r.get("syscalls")
    if not sc:
        return ""
    names = [n for n in PATHS if n in sc]
    top = list(sc["broker"]["per_request"])[:14]
    rows = [[f"`{call}`", *[f"{sc[n]['per_request'].get(call, 0):.2f}" for n in names]]
            for call in top]
    rows.append(["**total**", *[f"**{sc[n]['total']:.1f}**" for n in names]])
    return ("### System calls per request\n\n`strace -f -c` on each proxy (direct: on the "
            "upstream) while wrk sends POSTs at concurrency 1 for 2 s (not a timed run: "
            "strace slows the traced process).\n\n"
            + table(["syscall", *names], rows) + "\n\n")


def write_docs(r: dict[str, Any], rows: list[list[str]], checks: list[dict[str, Any]]) -> None:
    DOCS.mkdir(exist_ok=True)
    names = r["targets_present"]
    chart = DOCS / "bench-latency.svg"
    panels = [
        ("POST, concurrency 1", {n: r["post_c1"][n]["pcts_ms"] for n in names}),
        ("POST, concurrency 32", {n: r["post_c32"][n]["pcts_ms"] for n in names}),
        (f"SSE chunk delay ({r['options']['stream_concurrency']} streams, "
         f"chunks {r['options']['stream_pause_ms']:g} ms apart)",
         {n: [(p, r["chunks"][n]["chunk_ms"][str(p)]) for p in PCTS] for n in names}),
    ]
    svg_chart(panels, chart, "Latency percentiles: direct vs " + " vs ".join(names[1:]))
    doc_path = DOCS / "benchmarks.md"
    kept = ""
    if doc_path.exists():
        old = doc_path.read_text()
        if ANALYSIS_BEGIN in old and ANALYSIS_END in old:
            kept = old.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip("\n")
    if not kept:
        kept = "(No analysis yet: write it here; the script keeps this block when it reruns.)"
    m, o = r["machine"], r["options"]
    missed = [c for c in checks if c["ok"] is False]
    judged = [c for c in checks if c["ok"] is not None]
    shares = load_shares(r)
    busy = sum(shares) / len(shares) if shares else 0.0
    c32 = r["post_c32"]
    gen = {n: r["chunks"][n]["meter"]["generator_cpu_s"] / r["chunks"][n]["meter"]["wall_s"]
           for n in names}
    gen_open = {n: r["open"][n]["meter"]["generator_cpu_s"] / r["open"][n]["meter"]["wall_s"]
                for n in names}
    wrk_cpu = c32["direct"]["meter"]["wrk_cpu_s"] / c32["direct"]["meter"]["wall_s"]
    parts = [
        "# Benchmarks: the broker beside a direct connection",
        "",
        "Generated by `scripts/bench.py` (see *How to run*); the numbers below are from the "
        f"run of {m['date']} on commit {m['commit']}. Only the block marked *Analysis* is "
        "written by hand.",
        "",
        "## Results",
        "",
        *([f"**Warning**: other processes on this machine used {busy:.0%} of a core on "
           "average while this ran (see *Machine*), so latencies and throughput are worse "
           "than on a quiet machine; CPU per request is the steadier figure.", ""]
          if busy > 0.25 else []),
        table(header_cells(r), rows),
        "",
        "*broker vs direct*: the broker's number minus the direct one (x: the ratio); in a "
        "row that names two paths (broker ÷ bare, broker - bare, broker ÷ nginx), that "
        "comparison instead. *Added* is a path's figure minus the direct one. Latencies in "
        "ms; RSS is VmRSS (nginx: master + worker).",
        "",
        f"![latency percentiles: direct, {', '.join(names[1:])}](bench-latency.svg)",
        "",
        *(["### Workers sweep", "", table(*sweep_table(r)), "", sweep_note(r), ""]
          if r.get("workers") else []),
        "## Targets",
        "",
        table(["target", "wanted", "actual", "verdict", "by how much"],
              [[c["what"], c["target"], c["actual"], verdict(c["ok"]), c["by"]]
               for c in checks]),
        "",
        (f"{len(missed)} of {len(judged)} targets missed; what limits each is in *Analysis* "
         "and the profile below." if missed else f"All {len(judged)} targets met.")
        + (f" {len(checks) - len(judged)} could not be judged in this run (n/a: the path "
           "they compare with is absent)." if len(judged) < len(checks) else ""),
        "",
        "## Machine",
        "",
        table(["", ""], [
            ["CPUs (`nproc`)", m["nproc"]], ["CPU model", m["cpu"]], ["kernel", m["kernel"]],
            ["memory", f"{int(m['mem_mb']):,} MB"], ["Python", m["python"]],
            ["aiohttp", m["aiohttp"]], ["uvloop", m["uvloop"] + " (the broker uses it when "
                                        "installed)"], ["structlog", m["structlog"]],
            ["nginx", m["nginx"]], ["wrk", m["wrk"]],
            ["other load", load_note(r)],
        ]),
        "",
        "## Method",
        "",
        "Everything runs on this machine over 127.0.0.1, started by the script, in one run, "
        f"at niceness {r.get('niceness', 0)} (so that other work on the machine disturbs it "
        "less; it still shares the CPUs, see *other load*):",
        "",
        "- **upstream**: `scripts/bench_upstream.py`, a raw asyncio protocol on uvloop in its "
        "own process. `POST /v1/embeddings` answers a fixed ~1 KB JSON body (with `usage`); "
        "`POST /v1/chat/completions` streams N `chat.completion.chunk` SSE events "
        "(chunked) P ms apart, each stamped with `time.time_ns()` just before its write. It "
        "answers 401 unless `Authorization` carries the real key, so every 2xx proves the key "
        "was swapped in.",
        "- **direct**: the client talks to the upstream itself, sending the real key.",
        "- **broker**: the real path: `secret-broker init --backend file-vault` (key file), "
        "`add @openai_api_key --stdin`, `[providers.openai] base_url` at the upstream, a "
        "grant for consumer `default` (llm.embeddings, llm.chat; http_header_inject; the "
        "upstream's host:port), `[audit] fsync = \"batch\"`, `serve --log-format json` with "
        "its log going to a file. Each request: Host/Origin guard, bearer token, route match, "
        "lease (reused), key swap, upstream call, streamed answer, a sealed audit line and a "
        "JSON log line. After the run `secret-broker audit verify` checks the chain: "
        f"`{r['audit_verify']['output']}` ({r['audit_verify']['secs']:.1f} s).",
        "- **nginx** (where installed): `proxy_pass` to the same upstream with "
        "`proxy_set_header Authorization` (the key swap, without policy or audit), "
        "`proxy_buffering off`, upstream keep-alive, 1 worker process (the broker is one "
        "event loop).",
        "- **bare**: `scripts/bench_bare_proxy.py`, the simplest streaming aiohttp reverse "
        "proxy on uvloop, one process: a catch-all handler forwards method, path, query and "
        "body over one pooled `ClientSession` (`TCPConnector(limit=0)`, no decompression), "
        "swaps `Authorization` as nginx does, and streams the answer back with "
        "`StreamResponse` + `iter_any()`; no policy, audit or logging. What the framework "
        "alone costs: the broker's own work is the difference between it and bare.",
        "",
        f"1. **POST** (body {len(EMBED_BODY)} B, answer ~1 KB): wrk 1 thread, a Lua script "
        "setting body and `Authorization`, and reporting percentiles from wrk's own "
        f"histogram. Concurrency 1 then 32, {o['duration']:g} s each after "
        f"{o['warmup']:g} s of warm-up, one path after another. CPU per 1,000 requests is "
        "the proxy's utime+stime delta (`/proc/<pid>/stat`, all threads) over the measured "
        "run divided by wrk's request count.",
        f"2. **Streams**: a Python (uvloop) load generator in the script, since wrk cannot see "
        f"chunks. *Time to first event*: {o['ttfb_count']} sequential 3-chunk streams on one "
        "keep-alive connection, from writing the request to the first complete event. "
        f"*Chunk delay*: {o['stream_total']} streams of {o['stream_chunks']} chunks, "
        f"{o['stream_pause_ms']:g} ms apart, {o['stream_concurrency']} at a time; for each "
        "chunk, the arrival time (`time.time_ns()` when its bytes were read) minus the "
        "upstream's stamp. The broker's cost is its percentile minus the direct one.",
        f"3. **{o['open_streams']:,} streams open at once**: opened in batches of 100, 20 ms "
        f"apart, each {o['open_chunks']} chunks {o['open_pause_ms']:g} ms apart "
        f"({o['open_chunks'] * o['open_pause_ms'] / 1000:g} s); VmRSS of the proxy sampled "
        "every 100 ms; an error is a failed connect, a non-200, a timeout or a stream that "
        "ends early.",
        "4. **Idle**: VmRSS 1 s after start-up plus one request of each kind, and the CPU the "
        "idle process uses over 3 s.",
        "",
        "The load generators are not the limit: wrk drives the upstream directly at "
        f"{c32['direct']['rps']:,.0f} req/s ({c32['direct']['rps'] / c32['broker']['rps']:.0f}x"
        f" the broker's rate) using {wrk_cpu:.0%} of a core; the stream generator used "
        + ", ".join(f"{gen[n]:.0%} ({n})" for n in names)
        + " of a core in the chunk-delay phase and "
        + ", ".join(f"{gen_open[n]:.0%} ({n})" for n in names)
        + " with all streams open, and its direct percentiles are the floor the others are "
        "measured against. Caveat: this is a 2-core machine shared by the upstream, the "
        "proxy and the load generator (a proxy's own cost includes waking the others), and "
        "by anything else running on it (see *other load*).",
        "",
        "## Profile",
        "",
        profile_section(r),
        syscall_section(r),
        "## Analysis",
        "",
        ANALYSIS_BEGIN,
        kept,
        ANALYSIS_END,
        "",
        "## How to run",
        "",
        "```sh",
        "apt-get install -y wrk nginx strace # nginx, strace optional: their rows are skipped",
        "python -m pip install py-spy        # optional, into the same venv: the profile section",
        ".venv/bin/python scripts/bench.py   # ~5 min; rewrites this file and "
        "docs/bench-latency.svg",
        ".venv/bin/python scripts/bench.py --quick --no-docs   # ~2 min smoke run, "
        "table only",
        "```",
        "",
        "It runs the broker from this working tree (`python -m broker` with the repository "
        "on `PYTHONPATH`), so an edit to broker/ is measured by the next run. Useful options "
        "(`--help` lists all): `--wait-quiet SECS` waits for other processes to calm down "
        "first; `--phases post,profile` runs only some phases (the table only); "
        "`--src DIR` runs broker/ and grants/ from another tree, e.g. a patched copy, for "
        "an A/B comparison (the table only); `--broker-nofile 1024` starts the broker with "
        "systemd's default open-files limit; `--workers 1,2` adds the workers sweep (the "
        "broker with `serve --workers N`, bare with `--processes N`, POST at c=32 and 64); "
        "`--json FILE` keeps the raw results and "
        "`--report FILE` rebuilds this file from them; `--keep` keeps the temporary home, "
        "logs, py-spy stacks and strace counts.",
        "",
    ]
    doc_path.write_text("\n".join(parts))
    log(f"wrote {doc_path.relative_to(ROOT)} and {chart.relative_to(ROOT)}")


def parse_args(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true",
                    help="shorter phases (~2 min): 3 s wrk runs, 300 open streams")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 3)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds before each (default 2)")
    ap.add_argument("--ttfb-count", type=int, help="sequential streams for TTFB (default 300)")
    ap.add_argument("--stream-chunks", type=int, default=200)
    ap.add_argument("--stream-pause-ms", type=float, default=5.0)
    ap.add_argument("--stream-concurrency", type=int, default=8)
    ap.add_argument("--stream-total", type=int, help="streams per path (default 32; quick 16)")
    ap.add_argument("--open-streams", type=int, help="streams open at once (default 1000)")
    ap.add_argument("--open-chunks", type=int, default=40)
    ap.add_argument("--open-pause-ms", type=float, help="default 250 (10 s per stream)")
    ap.add_argument("--profile-secs", type=float, help="py-spy seconds per load (default 8)")
    ap.add_argument("--no-nginx", action="store_true", help="leave nginx out even if installed")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    ap.add_argument("--no-docs", action="store_true",
                    help="print only; do not rewrite docs/benchmarks.md and the chart")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp home, logs, profiles")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="which of post,streams,open,profile to run (default: all; docs "
                         "are written only for a run of all)")
    ap.add_argument("--src", type=Path, default=ROOT,
                    help="run broker/ and grants/ from this tree instead (A/B a patched copy)")
    ap.add_argument("--broker-nofile", type=int, metavar="N",
                    help="start the broker with this soft open-files limit (1024 is what "
                         "systemd gives a service unless LimitNOFILE= says otherwise)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="run everything at this niceness (default -10 where allowed, e.g. as "
                         "root: other processes on the machine disturb the numbers less)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="no run: rebuild the table and docs from a --json file of an earlier run")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECS",
                    help="first wait up to SECS for other processes to use < 20%% of a core")
    ap.add_argument("--workers", type=worker_list, default=(), metavar="LIST",
                    help="workers sweep, e.g. 1,2 or 1,2,4,8: for each N, the broker with "
                         "`serve --workers N` and bare with `--processes N`, POST req/s at "
                         "c=32 and c=64 (N=1 ÷ N=2 ... verdicts need 1 in the list)")
    a = ap.parse_args(argv)
    q = a.quick
    return Options(
        duration=a.duration or (3.0 if q else 10.0),
        warmup=a.warmup if a.warmup is not None else (1.0 if q else 2.0),
        ttfb_count=a.ttfb_count or (100 if q else 300),
        stream_chunks=a.stream_chunks, stream_pause_ms=a.stream_pause_ms,
        stream_concurrency=a.stream_concurrency,
        stream_total=a.stream_total or (16 if q else 32),
        open_streams=a.open_streams or (300 if q else 1000),
        open_chunks=a.open_chunks,
        open_pause_ms=a.open_pause_ms or (100.0 if q else 250.0),
        profile_secs=a.profile_secs or (3.0 if q else 8.0),
        nginx=not a.no_nginx, profile=not a.no_profile, docs=not a.no_docs, keep=a.keep,
        json_out=a.json, quick=q, wait_quiet=a.wait_quiet, report=a.report,
        phases=tuple(x.strip() for x in a.phases.split(",") if x.strip()), src=a.src,
        broker_nofile=a.broker_nofile, nice=a.nice, workers=a.workers)


def worker_list(text: str) -> tuple[int, ...]:
    """`1,2,8` -> (1, 2, 8): each N once, in the order given."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"each N must be ≥ 1: {text!r}")
    return tuple(dict.fromkeys(values))


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # so `finally` stops every process this script started


def main(argv: list[str] | None = None) -> int:
    global SRC
    signal.signal(signal.SIGTERM, _terminate)
    opts = parse_args(argv)
    unknown = set(opts.phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phase(s) {sorted(unknown)}; choose from {PHASES}")
    SRC = opts.src.resolve()
    if not (SRC / "broker" / "__main__.py").exists():
        raise SystemExit(f"--src {SRC}: no broker/ package there")
    if opts.docs and (set(opts.phases) != set(PHASES) or SRC != ROOT or opts.broker_nofile):
        log("not a full run of this tree: docs/ left alone (table only)")
        opts.docs = False
    started = time.monotonic()
    if opts.report is not None:
        results = json.loads(opts.report.read_text())
    else:
        results = run(opts)
        results["elapsed_s"] = time.monotonic() - started
    if opts.docs and not all(k in results for k in ("post_c1", "chunks", "open", "idle")):
        log("these results lack some phases: docs/ left alone (table only)")
        opts.docs = False
    rows, checks = summary_rows(results)
    print()
    print(text_table(header_cells(results), rows))
    print()
    if results.get("workers"):
        print("workers sweep")
        print(text_table(*sweep_table(results)))
        print(sweep_note(results))
        print()
    for c in checks:
        mark = "N/A   " if c["ok"] is None else "MET   " if c["ok"] else "MISSED"
        print(f"{mark} {c['what']}: {c['actual']} "
              f"(target {c['target']}){'; ' + c['by'] if c['by'] else ''}")
    if opts.json_out and opts.report is None:
        opts.json_out.write_text(json.dumps(results, indent=1, default=str))
    if opts.docs:
        write_docs(results, rows, checks)
    log(f"done in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
