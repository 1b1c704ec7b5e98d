"""The one harness in front of the stand-ins: a real daemon whose providers point at one
local stand-in upstream per provider, each expecting its real key, plus raw HTTP.

Raw requests go over plain sockets so a test controls every byte (duplicate
Content-Length, CL+TE, oversized or malformed headers): `http.client` and the SDKs would
refuse to send most of them. Every real key is a canary string, so a scan finds any leak.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from broker.core.home import Home
from broker.service.context import Context
from broker.service.secrets import Secrets
from tests.conftest import CANARY, Cli, Daemon, grant, start_daemon, write_grants
from tests.support.sdk_clients import openai_client
from tests.support.standins import StandIn

PROVIDERS = ("openai", "google", "jina", "voyage")
PURPOSES = '"llm.chat", "llm.embeddings", "llm.rerank"'
EMBED = json.dumps({"model": "m", "input": "a"}).encode()
GEMINI = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
JINA_BODY = {"model": "jina-embeddings-v3", "input": ["a"]}


def real_key(provider: str) -> str:
    """The provider key the broker holds and the stand-in expects: a canary, so any copy of
    it is found."""
    return f"{CANARY}-{provider}"


@dataclass
class Reply:
    """One HTTP response as read off the socket."""

    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    raw: bytes  # every byte received on the connection

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The broker's error code in any provider's shape (OpenAI, Google, detail)."""
        try:
            doc = self.json()
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        err = doc.get("error")
        if isinstance(err, dict):
            return str(err.get("reason") or err.get("code"))
        return str(doc["code"]) if "code" in doc else None


def exchange(port: int, data: bytes, *, source: str | None = None,
             timeout: float = 15.0) -> bytes:
    """Send exactly `data`, then read until the server closes the connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)  # a hang fails the test instead of stalling it
        if source is not None:
            sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def parse(raw: bytes) -> Reply:
    """The first response in `raw` (Content-Length or chunked framing)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response: {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
    elif "content-length" in headers:
        body = rest[: int(headers["content-length"])]
    else:
        body = rest
    return Reply(status, headers, body, raw)


def request_bytes(port: int, method: str, target: str,
                  headers: Sequence[tuple[str, str]] = (), body: bytes | None = None) -> bytes:
    """An HTTP/1.1 request with exactly these headers, a loopback Host unless one is given,
    Content-Length for a body, and Connection: close so the reply ends with the connection."""
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: 127.0.0.1:{port}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None and "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


@dataclass
class Broker:
    """A running daemon, its home and the stand-ins it forwards to."""

    cli: Cli
    daemon: Daemon
    standins: dict[str, StandIn]
    replies: list[Reply] = field(default_factory=list)  # every reply, for the leak scans

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def token(self) -> str:
        return self.daemon.token

    def http(self, method: str, target: str, *, headers: Sequence[tuple[str, str]] = (),
             body: bytes | None = None,
             token: str | None = "owner",  # noqa: S107 - names which token, is none
             source: str | None = None) -> Reply:
        """One request; `token="owner"` sends the bootstrap token, None sends none."""
        sent = list(headers)
        if token is not None:
            sent.insert(0, ("Authorization", f"Bearer {self.token if token == 'owner' else token}"))
        reply = parse(exchange(self.port, request_bytes(self.port, method, target, sent, body),
                               source=source))
        self.replies.append(reply)
        return reply

    def raw(self, data: bytes) -> bytes:
        """Exactly these bytes on a fresh connection; everything the broker sent back."""
        received = exchange(self.port, data)
        if received.startswith(b"HTTP/"):
            self.replies.append(parse(received))
        return received

    def post(self, provider: str, path: str, body: bytes | None = None, *,
             headers: Sequence[tuple[str, str]] = (),
             token: str | None = "owner") -> Reply:  # noqa: S107 - names which token
        payload = body if body is not None else (GEMINI if provider == "google" else EMBED)
        return self.http("POST", f"/proxy/{provider}/{path}", body=payload, token=token,
                         headers=[("Content-Type", "application/json"), *headers])

    def upstream_count(self) -> int:
        return sum(len(s.requests) for s in self.standins.values())

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Audit events straight from the file (no CLI process: fast, and it reads what is
        on disk, which is the point in the fault tests)."""
        lines = (self.cli.home / "audit.log").read_bytes().splitlines()
        events = [json.loads(line) for line in lines if line]
        return [e for e in events if event is None or e["event"] == event]

    def log(self) -> str:
        return self.daemon.log()

    def root(self, provider: str) -> str:
        """The base URL an SDK is given for `provider`: the daemon's proxy path."""
        return f"{self.daemon.url}/proxy/{provider}"

    def assert_only_real_key_upstream(self, provider: str, *tokens: str) -> None:
        """Every upstream request carried the real key and none of the broker tokens."""
        stand = self.standins[provider]
        assert stand.requests, "upstream saw no request"
        for rec in stand.requests:
            sent = json.dumps(rec.headers) + rec.query + rec.body.decode(errors="replace")
            assert real_key(provider) in sent
            for token in (self.daemon.token, *tokens):
                assert token not in sent

    def audit(self, event: str) -> list[dict[str, Any]]:
        """Audit events as `secret-broker audit` lists them (through the CLI)."""
        return list(json.loads(self.cli.ok("audit", "--event", event, "--json"))["events"])

    def stop(self) -> None:
        if self.daemon.proc.poll() is None:
            self.daemon.stop()


def write_config(home: Path, standins: dict[str, StandIn], *,
                 base_urls: dict[str, str] | None = None, extra: str = "") -> None:
    urls = {p: s.base_url for p, s in standins.items()} | (base_urls or {})
    providers = "".join(f'[providers.{p}]\nbase_url = "{u}"\n\n' for p, u in urls.items())
    (home / "config.toml").write_text(f'[store]\nbackend = "file-vault"\n{extra}\n{providers}')


def provider_grants(standins: dict[str, StandIn], consumer: str = "default",
                    delivery: str = '"http_header_inject"') -> str:
    """One grant per provider: its own key, to its own stand-in's host, nothing more."""
    return "".join(grant(f"{p}_api_key", consumer, PURPOSES, delivery, f'"{s.host}"')
                   for p, s in standins.items())


def configure(cli: Cli, standins: dict[str, StandIn], *,
              base_urls: dict[str, str] | None = None, extra: str = "") -> None:
    """Point the providers at the stand-ins and grant each its own key (default consumer)."""
    write_config(cli.home, standins, base_urls=base_urls, extra=extra)
    write_grants(cli.home, provider_grants(standins))


def add_secrets(cli: Cli, values: dict[str, tuple[str, str]]) -> None:
    """Store ref -> (provider, value) through the service layer, in this process: what
    `secret-broker add` does, without an interpreter start per secret."""
    ctx = Context.open(Home(cli.home), cli.env)
    try:
        for ref, (provider, value) in values.items():
            Secrets(ctx).add(ref, provider, "api_key", value)
    finally:
        ctx.audit_log.close()
        ctx.metadata.close()


def launch(cli: Cli, standins: dict[str, StandIn], *, base_urls: dict[str, str] | None = None,
           extra: str = "", grants: str | None = None, env: dict[str, str] | None = None,
           before_start: Callable[[], None] | None = None) -> Broker:
    """Store each stand-in's canary key, point the providers at the stand-ins, start."""
    add_secrets(cli, {f"{p}_api_key": (p, real_key(p)) for p in standins})
    write_config(cli.home, standins, base_urls=base_urls, extra=extra)
    write_grants(cli.home, provider_grants(standins) if grants is None else grants)
    if before_start is not None:
        before_start()
    return Broker(cli, start_daemon(cli.home, {**cli.env, **(env or {})}), standins)


def start_standins(providers: Sequence[str] = PROVIDERS) -> dict[str, StandIn]:
    return {p: StandIn(p, real_key(p)).start() for p in providers}


def stop_standins(standins: dict[str, StandIn]) -> None:
    for s in standins.values():
        s.stop()


def kill(daemon: Daemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.kill()
        daemon.proc.wait()


async def race_a_budget(b: Broker, concurrent: int = 20) -> list[bool]:
    """`concurrent` chat requests at once under a new consumer token with a daily budget of
    100 tokens (each costs the stand-in's 7 + 5): which were served. A refused one must be
    the SDK's RateLimitError with code budget_exceeded."""
    token = json.loads(b.cli.ok("token", "create", "--consumer", "default",
                                "--daily-tokens", "100", "--json"))["token"]
    client = openai_client(b.root("openai"), token, async_=True)

    async def one() -> bool:
        try:
            await client.chat.completions.create(
                model="budget", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded"
            return False
        return True

    try:
        return list(await asyncio.gather(*(one() for _ in range(concurrent))))
    finally:
        await client.close()
