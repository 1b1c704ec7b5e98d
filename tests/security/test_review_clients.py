"""Clients that would hand their token to the wrong listener, and answers that carry values.

Another local user is played by a real second uid (nobody, 65534): the tests run as root,
so a forked child drops to that uid and listens, or connects, as that user would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.core.errors import BrokerError, BrokerNotRunning, ConfigError
from tests.conftest import Cli, scan
from tests.integration.test_mcp import agent, create_token, grant_openai_to
from tests.support.gateway import Broker, exchange
from tests.support.standins import StandIn

NOBODY = 65534
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n' \
     b'Connection: close\r\n\r\n{}'
REDIRECT = b'HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Type: ' \
           b'application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}'


def _forked(uid: int, work: Callable[[int], None]) -> tuple[int, int]:
    """Run work(pipe) in a child that runs as `uid`; return (pid, read end of the pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            if uid != os.getuid():
                os.setgid(uid)
                os.setuid(uid)
            work(write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Listener:
    """A loopback listener in another process that records every byte it is sent."""

    pid: int
    port: int
    _pipe: int

    def received(self) -> bytes:
        """Stop it; everything it was sent."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        try:
            return _read_all(self._pipe)
        finally:
            os.close(self._pipe)


@contextmanager
def listener(uid: int = NOBODY, reply: bytes = OK) -> Iterator[Listener]:
    """Listen on a free loopback port as `uid`; answer each request with `reply`."""
    def serve(pipe: int) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        os.write(pipe, b"%5d" % sock.getsockname()[1])
        while True:
            conn, _ = sock.accept()
            with contextlib.suppress(OSError):
                conn.settimeout(10)
                data = conn.recv(65536)
                os.write(pipe, data)
                if data:
                    conn.sendall(reply)
            conn.close()

    pid, pipe = _forked(uid, serve)
    port = int(os.read(pipe, 5))
    found = Listener(pid, port, pipe)
    try:
        yield found
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError, OSError):
            found.received()


def as_nobody(port: int, data: bytes) -> bytes:
    """Send `data` to 127.0.0.1:port from a socket of uid nobody; the raw answer."""
    pid, pipe = _forked(NOBODY, lambda out: os.write(out, exchange(port, data)) and None)
    try:
        return _read_all(pipe)
    finally:
        os.close(pipe)
        os.waitpid(pid, 0)


def set_listen(home: Path, listen: str) -> None:
    config = home / "config.toml"
    config.write_text(re.sub(r'(?m)^listen = .*$', f'listen = "{listen}"', config.read_text()))


# --- finding 1: a squatter on the loopback port ------------------------------------------------


def test_a_client_sends_no_token_to_a_port_another_user_holds(cli: Cli) -> None:
    """With the broker down and its port taken by uid nobody, the client refuses to send."""
    with listener() as squatter:
        client = BrokerClient.from_env({"SECRET_BROKER_URL": f"http://127.0.0.1:{squatter.port}",
                                        "SECRET_BROKER_TOKEN": "sbc_secret-token"}, timeout=10)
        with pytest.raises(BrokerNotRunning, match=f"belongs to uid {NOBODY}, not yours"):
            client.health()
        assert squatter.received() == b""


@pytest.mark.parametrize("found_by", ["url", "listen"])
async def test_the_mcp_server_sends_no_token_to_a_port_another_user_holds(
        cli: Cli, found_by: str) -> None:
    """By SECRET_BROKER_URL the uid check refuses; by the home it takes the Unix socket."""
    token = create_token(cli, "agent-a")
    with listener() as squatter:
        env = {**cli.env, "SECRET_BROKER_TOKEN": token}
        if found_by == "url":
            env["SECRET_BROKER_URL"] = f"http://127.0.0.1:{squatter.port}"
        else:
            set_listen(cli.home, f"127.0.0.1:{squatter.port}")
        async with agent(env, cli.home) as a:
            message = await a.error("list_secrets")
        assert squatter.received() == b""
        assert "not running" in message or "not your broker" in message
    assert scan(a.everything(), token) == []


def test_start_names_who_holds_the_port(cli: Cli) -> None:
    """`start` on a port another user listens on says which process and uid hold it."""
    with listener() as squatter:
        set_listen(cli.home, f"127.0.0.1:{squatter.port}")
        proc = cli("start", "--timeout", "20")
        assert proc.returncode != 0
        assert f"held by pid {squatter.pid} " in proc.stderr
        assert f"uid {NOBODY}" in proc.stderr


def test_a_login_code_from_another_users_socket_is_refused(cli: Cli, daemon_factory: Any) -> None:
    """A login code sent from uid nobody's socket opens no session; the owner's still does."""
    d = daemon_factory()
    code = d.client(unix=True).request("POST", "/v1/admin/ui/code")["code"]
    body = json.dumps({"code": code}).encode()
    request = (f"POST /ui/api/session HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nContent-Type: "
               f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               ).encode() + body
    refused = as_nobody(d.port, request)
    assert refused.startswith(b"HTTP/1.1 401 ") and b"sbs_" not in refused
    failed = json.loads(cli.ok("audit", "--event", "auth.failed", "--json"))["events"]
    assert [e["reason"] for e in failed] == ["login_code_peer_uid"]
    assert exchange(d.port, request).startswith(b"HTTP/1.1 200 ")


# --- finding 2: SECRET_BROKER_URL forms ------------------------------------------------------


@pytest.mark.parametrize("form", [
    "https://127.0.0.1:{port}", "http://127.0.0.1:{port}/prefix", "http://127.0.0.1:{port}/?a=1",
    "http://me@127.0.0.1:{port}", "http://example.com:{port}", "http://10.0.0.1:{port}",
    "ftp://127.0.0.1:{port}", "http://127.0.0.1", "unix:relative/broker.sock",
    "unix://host/broker.sock",
])
def test_a_url_that_is_not_loopback_http_or_unix_is_refused(form: str) -> None:
    """Each is refused before any connection, naming the variable and the accepted forms."""
    with listener(uid=os.getuid()) as local:
        url = form.format(port=local.port)
        with pytest.raises(ConfigError, match=r"SECRET_BROKER_URL .*unix:///"):
            BrokerClient.from_env({"SECRET_BROKER_URL": url, "SECRET_BROKER_TOKEN": "sbc_t"})
        assert local.received() == b""


def test_loopback_and_unix_urls_are_accepted() -> None:
    """Every loopback spelling and an absolute unix path are the accepted forms."""
    from broker.client import parse_url

    assert parse_url("http://127.0.0.2:80/") == ("127.0.0.2", 80)
    assert parse_url("http://[::1]:8443") == ("::1", 8443)
    assert parse_url("http://localhost:1") == ("localhost", 1)
    assert parse_url("unix:///run/broker.sock") == Path("/run/broker.sock")


async def test_the_mcp_server_refuses_an_https_url(cli: Cli) -> None:
    """An https:// URL is never spoken as plain HTTP: every tool is refused, nothing is sent."""
    token = create_token(cli, "agent-a")
    with listener(uid=os.getuid()) as local:
        env = {**cli.env, "SECRET_BROKER_TOKEN": token,
               "SECRET_BROKER_URL": f"https://127.0.0.1:{local.port}"}
        async with agent(env, cli.home) as a:
            message = await a.error("usage")
        assert "every tool is refused" in message and "SECRET_BROKER_URL" in message
        assert local.received() == b""


def test_a_redirect_is_an_error() -> None:
    """A 3xx answer is not success, and is not followed."""
    with listener(uid=os.getuid(), reply=REDIRECT) as local, \
            pytest.raises(BrokerError, match="HTTP 302"):
        BrokerClient(url=f"http://127.0.0.1:{local.port}", timeout=10).health()


# --- finding 3: MCP answers scrubbed of every stored value ------------------------------------


async def test_mcp_answers_hold_no_stored_value_of_any_shape(
        gateway: Broker, standins: dict[str, StandIn]) -> None:
    """A value shaped like no provider key, echoed plain and in base64, never reaches the
    model; the rest of the answer does."""
    plain = "hunter2-plain~~~looking-value"  # its base64 differs from its base64url
    gateway.cli.add("@plain_value", plain, provider="voyage")
    grant_openai_to(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-a")
    url_safe = base64.urlsafe_b64encode(plain.encode()).decode()
    forms = [plain, base64.b64encode(plain.encode()).decode(), url_safe, url_safe.rstrip("=")]
    echo = {"echo": forms, "text": f"it is {plain}.", "ok": "kept"}
    env = {**gateway.cli.env, "SECRET_BROKER_TOKEN": token,
           "SECRET_BROKER_URL": gateway.daemon.url}
    async with agent(env, gateway.cli.home) as a:
        standins["openai"].force = (200, json.dumps(echo).encode(),
                                    {"Content-Type": "application/json"})
        answer = (await a.ok("call_provider", provider="openai", path="v1/embeddings",
                             body={"input": "x"}))["answer"]
        assert answer["ok"] == "kept" and answer["text"] == "it is [redacted]."
        stream = "".join(f"data: {json.dumps({'v': f})}\n\n" for f in forms).encode()
        standins["openai"].force = (200, stream, {"Content-Type": "text/event-stream"})
        events = (await a.ok("call_provider", provider="openai", path="v1/chat/completions",
                             body={"stream": True}))["answer"]
        assert len(events) == len(forms)
    assert scan(a.everything(), *forms) == []


def test_a_cut_answer_keeps_no_start_of_a_value() -> None:
    """Each form is replaced; where the answer was cut, a value's first bytes at its end go."""
    from broker.gateway.scrub import scrub_bytes

    value = "hunter2-plain~~~looking-value"
    encoded = base64.b64encode(value.encode())
    assert scrub_bytes(b"a " + value.encode() + b" " + encoded, [value]) == \
        b"a [redacted] [redacted]"
    assert scrub_bytes(b"ok " + encoded[:9], [value], cut=True) == b"ok "
    assert scrub_bytes(b"ok " + encoded[:9], [value]) == b"ok " + encoded[:9]
