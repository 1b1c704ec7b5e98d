"""Findings of an outside review, each driven as the attacker or accident would: the
dashboard's login code read from another process's command line, oversized JSON on the
routes, absurd `max_tokens` against a daily budget, a stored value no header can carry,
and connections whose request headers never end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError, parse_config
from broker.core import clock
from broker.gateway import usage
from broker.server.inputs import JSON_LIMIT, VALUE_JSON_LIMIT
from broker.server.ui import LOGIN_LIMIT
from broker.service import secrets as service_secrets
from broker.store.metadata import Metadata
from tests.conftest import CANARY, Cli, grant, wait_for
from tests.support.gateway import (
    PURPOSES,
    Broker,
    Reply,
    add_secrets,
    kill,
    launch,
    parse,
    provider_grants,
    request_bytes,
    start_standins,
    stop_standins,
)
from tests.support.standins import StandIn


@pytest.fixture(scope="module")
def shared(module_home: Cli) -> Iterator[Broker]:
    stands = start_standins(("openai", "google"))
    b = launch(module_home, stands)
    yield b
    kill(b.daemon)
    stop_standins(stands)


def assert_no_handler_crashed(b: Broker) -> None:
    assert "Traceback" not in b.log() and '"internal.error"' not in b.log(), b.log()[-2000:]


def redeem(b: Broker, code: str) -> Reply:
    """Trade a login code at the dashboard's login route, as its page does."""
    return b.http("POST", "/ui/api/session", token=None, body=json.dumps({"code": code}).encode(),
                  headers=[("Content-Type", "application/json")])


# --- 1. the dashboard's login code is never in a command line or an environment ----------------

FAKE_BROWSER = """#!/bin/sh
# Records what it was asked to open, then stays open (as a browser would) until released.
printf '%s\\n' "$@" > "$0.opened"
i=0
while [ ! -e "$0.release" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
"""

# Run as its own process: what any local user can read of every other process.
SCANNER = r"""
import os, re
found = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    for part in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        found.update(m.decode() for m in re.findall(rb"code=([A-Za-z0-9_-]{20,})", data))
print("\n".join(sorted(found)))
"""


def test_ui_login_code_is_in_no_command_line_and_its_file_is_private(gw: Broker,
                                                                     tmp_path: Path) -> None:
    """While `ui` opens the browser, no code in any /proc cmdline or environ redeems; the
    browser gets a 0600 file in run/ that redirects to a link that works once."""
    run = gw.cli.home / "run"
    stale = run / "ui-stale.html"
    stale.write_text("old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    browser = tmp_path / "fake-browser"
    browser.write_text(FAKE_BROWSER)
    browser.chmod(0o700)
    opened = Path(f"{browser}.opened")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "ui"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
        env={**gw.cli.env, "BROWSER": str(browser), "DISPLAY": ":99"})
    try:
        wait_for(lambda: opened.exists() and opened.read_text().strip(), what="the browser")
        scanned = subprocess.run([sys.executable, "-c", SCANNER], capture_output=True,
                                 text=True, check=True, timeout=60).stdout.split()
        redeemed = [code for code in scanned if redeem(gw, code).status == 200]
        assert redeemed == [], "a login code read from /proc opened a dashboard session"
    finally:
        Path(f"{browser}.release").touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "#code=" not in out + err
    target = opened.read_text().strip()
    assert target.startswith("file://") and "code" not in target
    page = Path(target.removeprefix("file://"))
    assert page.parent == run and re.fullmatch(r"ui-[A-Za-z0-9_-]{16,}\.html", page.name)
    info = page.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    assert not stale.exists()  # an old page (its code long dead) is deleted
    found = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', page.read_text())
    assert found, page.read_text()
    url = found.group(1).replace("&amp;", "&")
    assert url.startswith(f"http://127.0.0.1:{gw.port}/ui/#code=")
    code = url.split("#code=")[1]
    assert code not in scanned
    first, again = redeem(gw, code), redeem(gw, code)
    assert first.status == 200 and first.json()["token"].startswith("sbs_")
    assert (again.status, again.code) == (401, "unauthorized")
    printed = gw.cli.ok("ui", "--print").strip()  # by hand, the owner still gets the link
    assert printed.startswith(f"http://127.0.0.1:{gw.port}/ui/#code=")


# --- 2. every route's body has a limit that fits it; large proxy bodies are never parsed whole ----


def reply_to(port: int, head: bytes, body: bytes = b"") -> Reply:
    """Send `head` (and `body`), read only until the first response is complete: a server
    that answers before reading a body may still drain it before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head)
        # Refused before the body was all sent? The answer is there all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(body)
        received = b""
        while True:
            head_end = received.find(b"\r\n\r\n")
            if head_end >= 0:
                length = re.search(rb"(?i)content-length: *(\d+)", received[:head_end])
                if length and len(received) >= head_end + 4 + int(length.group(1)):
                    return parse(received)
            chunk = sock.recv(65536)
            if not chunk:
                return parse(received)
            received += chunk


def header(port: int, method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    return request_bytes(port, method, target, headers)[:-2]  # open for more headers


def session_token(b: Broker) -> str:
    code = b.daemon.client(unix=True).request("POST", "/v1/admin/ui/code")["code"]
    return str(redeem(b, code).json()["token"])


# Each JSON route with the body limit it must keep: a login, a plain request, or a body that
# carries a secret's value (room for the largest value, fully escaped).
JSON_ROUTES = [("POST", "/ui/api/session", None, LOGIN_LIMIT),
               ("POST", "/v1/leases", "owner", JSON_LIMIT),
               ("POST", "/v1/explain", "owner", JSON_LIMIT),
               ("POST", "/v1/mcp/tool-called", "owner", JSON_LIMIT),
               ("POST", "/v1/admin/secrets", "owner", VALUE_JSON_LIMIT),
               ("PUT", "/v1/admin/secrets/x", "owner", VALUE_JSON_LIMIT),
               ("POST", "/v1/admin/tokens", "owner", JSON_LIMIT),
               ("POST", "/ui/api/secrets", "session", VALUE_JSON_LIMIT)]


@pytest.mark.parametrize(("method", "path", "who", "limit"), JSON_ROUTES)
def test_oversized_json_is_413_before_it_is_read(gw: Broker, method: str, path: str,
                                                 who: str | None, limit: int) -> None:
    """A declared multi-MB body is refused before a byte of it is read; a chunked one as
    soon as it passes the route's limit; a body just past the limit too."""
    auth = {"owner": gw.token, "session": session_token(gw) if who == "session" else ""}
    headers = [("Content-Type", "application/json")]
    if who is not None:
        headers.append(("Authorization", f"Bearer {auth[who]}"))
    declared = reply_to(gw.port, header(gw.port, method, path, headers)
                        + b"Content-Length: 30000000\r\n\r\n")  # and no body at all
    assert (declared.status, declared.code) == (413, "body_too_large"), declared.body
    chunk = b'{"code": "' + b"a" * 0x10000 + b'"}'
    chunked = reply_to(gw.port, header(gw.port, method, path, headers)
                       + b"Transfer-Encoding: chunked\r\n\r\n",
                       b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(64)))
    assert (chunked.status, chunked.code) == (413, "body_too_large"), chunked.body
    just_over = json.dumps({"code": "a" * limit}).encode()
    over = gw.http(method, path, body=just_over, headers=headers, token=None)
    assert (over.status, over.code) == (413, "body_too_large"), over.body
    assert gw.http("GET", "/v1/health").status == 200
    assert_no_handler_crashed(gw)


def test_a_small_login_and_json_still_work(gw: Broker) -> None:
    """The limits leave room for what the routes really take: a login, a secret's value."""
    assert session_token(gw).startswith("sbs_")
    value = CANARY + "v" * 20_000  # a certificate chain's size
    added = gw.http("POST", "/v1/admin/secrets", body=json.dumps(
        {"ref": "cert_chain", "provider": "internal", "kind": "certificate", "value": value}
    ).encode(), headers=[("Content-Type", "application/json")])
    assert added.status == 201, added.body
    assert CANARY not in gw.log()


def test_large_proxy_bodies_are_scanned_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PARSE_LIMIT a request body is never json-parsed whole; its model and token
    limit are still found where the SDKs put them (first or last keys)."""
    parsed: list[int] = []
    real_loads = json.loads

    def loads(text: Any, **kw: Any) -> Any:
        parsed.append(len(text))
        return real_loads(text, **kw)

    monkeypatch.setattr(usage.json, "loads", loads)
    filler = "x" * (usage.PARSE_LIMIT + 10)
    openai_like = json.dumps({"messages": [{"role": "user", "content": filler}],
                              "model": "gpt-big", "max_tokens": 77}).encode()
    anthropic_like = json.dumps({"max_tokens": 55, "messages": [{"content": filler}],
                                 "model": "claude-big"}).encode()
    gemini_like = json.dumps({"contents": [{"parts": [{"text": filler}]}],
                              "generationConfig": {"maxOutputTokens": 33}}).encode()
    deep = b"[" * (usage.PARSE_LIMIT + 10)
    for body, model, limit in ((openai_like, "gpt-big", 77), (anthropic_like, "claude-big", 55),
                               (gemini_like, None, 33), (deep, None, None)):
        doc = usage.request_doc(body)
        assert usage.request_model({}, doc) == model
        expected = len(body) // 4 + (limit or usage.DEFAULT_OUTPUT_ESTIMATE)
        assert usage.estimate_tokens(body, doc) == expected
    assert all(size <= usage.PARSE_LIMIT for size in parsed)
    small = json.dumps({"model": "m", "max_tokens": 9, "tools": [{"model": "nested"}]})
    assert usage.request_model({}, usage.request_doc(small.encode())) == "m"  # parsed: exact


# --- 3. absurd max_tokens never lowers what a daily budget is charged ----------------------------

ABSURD = [-10**12, -1, True, 1.5, "100", 10**12, None, [5]]


def chat(max_tokens: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True, "max_tokens": max_tokens}).encode()


def test_absurd_max_tokens_are_charged_the_default_estimate(gw: Broker) -> None:
    """Negative, huge, fractional, boolean or string max_tokens count as unknown: the
    default is reserved and, with no usage in the answer, charged; never a negative."""
    made = json.loads(gw.cli.ok("token", "create", "--consumer", "default", "--daily-tokens",
                                "20000", "--json"))
    token = made["token"]
    expected = 0
    for max_tokens in ABSURD:  # streamed without include_usage: the answer has no usage
        reply = gw.post("openai", "v1/chat/completions", chat(max_tokens), token=token)
        assert reply.status == 200, (max_tokens, reply.body)
        expected += len(chat(max_tokens)) // 4 + usage.DEFAULT_OUTPUT_ESTIMATE
    metadata = Metadata(gw.cli.home / "metadata.db")
    try:
        wait_for(lambda: metadata.token_spend(clock.utc_day()).get(
            (made["id"], clock.utc_day())) == expected, what=f"a flushed spend of {expected}")
    finally:
        metadata.close()
    over = gw.post("openai", "v1/chat/completions", chat(20000 - expected), token=token)
    assert (over.status, over.code) == (429, "budget_exceeded")


def test_budgets_never_settle_a_negative_amount() -> None:
    """Whatever a caller passes, a reservation and a settlement are never below zero."""
    budgets = usage.Budgets()
    held = budgets.reserve("tok", "d", 100, -10**9)
    assert held is not None and held.estimate == 0
    budgets.settle(held, -10**9)
    assert budgets.used[("tok", "d")] == 0 and budgets.drain() == {("tok", "d"): 0}
    assert budgets.reserve("tok", "d", 100, 101) is None


def test_a_negative_usage_from_upstream_is_unknown() -> None:
    """An upstream's negative or absurd token counts are not counts."""
    tap = usage.UsageTap("openai", "application/json", None)
    tap.feed(json.dumps({"usage": {"prompt_tokens": -500, "completion_tokens": 10**12}}).encode())
    found = tap.finish()
    assert found.input_tokens is None and found.output_tokens in (None, 0)
    assert found.total >= 0


# --- 4. a stored value that no header can carry: 503 in the provider's shape ---------------------

UNSENDABLE = {"ctl_soh": "\x01", "ctl_esc": "\x1b", "ctl_del": "\x7f", "ctl_bs": "\x08",
              "line_feed": "\n", "nul": "\x00", "vertical_tab": "\x0b"}


@pytest.fixture
def planted(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    """A broker whose store holds values with control characters (as an older version, a
    restored backup or another tool could have written), granted like any other."""
    stands = start_standins(("openai", "google"))
    monkeypatch.setattr(service_secrets, "_check_value", lambda value: None)
    values = {f"{name}_{p}": (p, f"{CANARY}{char}tail") for name, char in UNSENDABLE.items()
              for p in stands}
    add_secrets(cli, values)
    grants = provider_grants(stands) + "".join(
        grant(ref, "default", PURPOSES, '"http_header_inject"', f'"{stands[p].host}"')
        for ref, (p, _v) in values.items())
    b = launch(cli, stands, grants=grants)
    yield b
    kill(b.daemon)
    stop_standins(stands)


def test_a_value_no_header_can_carry_is_503_secret_unavailable(planted: Broker) -> None:
    """Each control character gives a JSON 503 secret_unavailable in the provider's shape,
    naming the ref and the fix, never the value; nothing goes upstream."""
    for name in UNSENDABLE:
        for provider, path in (("openai", "v1/embeddings"),
                               ("google", "v1beta/models/g:generateContent")):
            ref = f"{name}_{provider}"
            reply = planted.post(provider, path, headers=[("X-Broker-Secret-Ref", ref)])
            assert (reply.status, reply.code) == (503, "secret_unavailable"), (ref, reply.raw)
            message = reply.json()["error"]["message"]
            assert f"@{ref}" in message and f"secret-broker rotate @{ref}" in message
            assert CANARY not in reply.raw.decode("latin-1")
            if provider == "google":
                assert reply.json()["error"]["status"] == "UNAVAILABLE"
    assert planted.upstream_count() == 0
    assert CANARY not in planted.log()
    assert_no_handler_crashed(planted)
    assert planted.post("openai", "v1/embeddings",
                        headers=[("X-Broker-Secret-Ref", "openai_api_key")]).status == 200


# --- 5. a request whose headers never end is closed -------------------------------------------

PARTIAL = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1"  # no final CRLFs, then nothing


def closed_by_server(sock: socket.socket) -> bool:
    """Wait (20 s at most) for the server to close; True if it did."""
    sock.settimeout(20)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_request_whose_headers_never_end_is_closed(cli: Cli) -> None:
    """On TCP and on the Unix socket, a connection that never finishes its headers, or
    trickles them byte by byte, is closed after [limits] header_timeout_secs."""
    stands: dict[str, StandIn] = start_standins(("openai",))
    b = launch(cli, stands, extra="[limits]\nheader_timeout_secs = 1\n")
    try:
        tcp = socket.create_connection(("127.0.0.1", b.port))
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.connect(str(cli.home / "run" / "broker.sock"))
        silent = socket.create_connection(("127.0.0.1", b.port))  # connects, sends nothing
        for sock in (tcp, unix):
            sock.sendall(PARTIAL)
        trickle, closed = socket.create_connection(("127.0.0.1", b.port)), False
        try:
            for byte in PARTIAL:  # a byte at a time, each one well inside the timeout
                trickle.sendall(bytes([byte]))
                time.sleep(0.1)  # the attacker's pace, not a wait for the broker
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        assert closed or closed_by_server(trickle), "a trickled request was never closed"
        for sock in (tcp, unix, silent):
            assert closed_by_server(sock), "a half-sent request was never closed"
            sock.close()
        trickle.close()
        assert b.http("GET", "/v1/health").status == 200  # complete requests still work
        assert b.post("openai", "v1/embeddings").status == 200
    finally:
        kill(b.daemon)
        stop_standins(stands)


def test_header_timeout_is_validated() -> None:
    """The setting is checked like every other limit."""
    assert parse_config("[limits]\nheader_timeout_secs = 2.5\n").header_timeout_secs == 2.5
    for bad in ("0", "-1", '"10"', "true"):
        with pytest.raises(ConfigError, match="header_timeout_secs"):
            parse_config(f"[limits]\nheader_timeout_secs = {bad}\n")
