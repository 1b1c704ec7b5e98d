"""Faults: upstreams that refuse, reset, hang, fail or redirect; an audit log that cannot be
written; vault files damaged under a running daemon; SIGKILL mid-request; a grants file
rewritten under load. The broker answers each with its documented refusal and recovers.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path

from broker.client import BrokerClient
from tests.conftest import (
    CANARY,
    CANARY_2,
    Cli,
    ext4_image,
    grant,
    move_audit_log,
    scan,
    start_daemon,
    tmpfs,
    wait_for,
    write_grants,
)
from tests.support.gateway import (
    PURPOSES,
    Broker,
    exchange,
    kill,
    launch,
    real_key,
    request_bytes,
)
from tests.support.standins import StandIn

STREAM = json.dumps({"model": "m", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]}).encode()
NATIVE = b'{"secret_ref": "openai_api_key", "purpose": "llm.chat", "delivery": "native"}'


def grant_to(ref: str, host: str, consumer: str = "default",
             delivery: str = '"http_header_inject"') -> str:
    return grant(ref, consumer, PURPOSES, delivery, f'"{host}"')


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def verify_audit(cli: Cli) -> None:
    out = cli.ok("audit", "verify")
    assert "audit log OK" in out, out


# --- upstream faults ----------------------------------------------------------------------------


def test_upstream_faults_become_gateway_errors_and_the_broker_keeps_serving(
        cli: Cli, standins: dict[str, StandIn]) -> None:
    """Refused 502, hang 504, 5xx as sent, redirects 502 unfollowed, resets cut; still serving."""
    refused = closed_port()
    hang, redirect = standins["jina"], standins["voyage"]
    grants = (grant_to("openai_api_key", standins["openai"].host)
              + grant_to("google_api_key", f"127.0.0.1:{refused}")
              + grant_to("jina_api_key", hang.host) + grant_to("voyage_api_key", redirect.host))
    b = launch(cli, standins, grants=grants,
               extra="[limits]\nread_timeout_secs = 1\nconnect_timeout_secs = 2\n",
               base_urls={"google": f"http://127.0.0.1:{refused}",
                          "jina": hang.base_url + "/_hang",
                          "voyage": redirect.base_url + "/_redirect"})
    try:
        gone = b.post("google", "v1beta/models/gemini-2.0-flash:generateContent")
        assert (gone.status, gone.code) == (502, "upstream_unreachable")
        slow = b.post("jina", "v1/embeddings")
        assert (slow.status, slow.code) == (504, "upstream_timeout")
        assert hang.hanging.is_set()
        for status in (301, 302, 303, 307, 308):
            redirect.redirect_status = status
            moved = b.post("voyage", "v1/embeddings")
            assert (moved.status, moved.code) == (502, "upstream_redirect"), status
            assert "location" not in moved.headers
        assert not redirect.redirected_hit
        assert len(redirect.requests) == 5  # each redirect answered once, never followed
        openai = standins["openai"]
        for status in (500, 503):
            openai.force = (status, b'{"error": {"message": "upstream broke", "type": "x"}}')
            failed = b.post("openai", "v1/embeddings")
            assert failed.status == status and b"upstream broke" in failed.body
        openai.n_chunks, openai.reset_after = 10, 2
        reset = exchange(b.port, request_bytes(b.port, "POST", "/proxy/openai/v1/chat/completions",
                                               [("Authorization", f"Bearer {b.token}")], STREAM))
        assert reset.startswith(b"HTTP/1.1 200") and not reset.endswith(b"0\r\n\r\n")
        openai.reset_after, openai.stall_after = None, 2
        stalled = exchange(b.port, request_bytes(b.port, "POST",
                                                 "/proxy/openai/v1/chat/completions",
                                                 [("Authorization", f"Bearer {b.token}")],
                                                 STREAM))
        assert stalled.startswith(b"HTTP/1.1 200") and not stalled.endswith(b"0\r\n\r\n")
        openai.stall_after = None

        def outcomes() -> Counter[str]:
            return Counter(str(e.get("outcome")) for e in b.events("proxy.request"))

        wait_for(lambda: outcomes()["upstream_reset"] == 1 and outcomes()["upstream_timeout"] == 2,
                 what="the reset and the stall in the audit")
        seen = outcomes()
        assert seen["upstream_unreachable"] == 1 and seen["upstream_redirect"] == 5
        assert b.post("openai", "v1/embeddings").status == 200
    finally:
        b.stop()
    assert scan([b.log(), *(r.body.decode(errors="replace") for r in b.replies)], CANARY) == []


# --- the audit log cannot be written ------------------------------------------------------------


def fill(directory: Path) -> Path:
    """Write a filler file until the file system is full (bounded: the tmpfs is small)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(10_000):
            try:
                if os.write(fd, b"\0" * 65536) < 65536:
                    continue
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler
    finally:
        os.close(fd)
    raise AssertionError("the tmpfs never filled up")


def test_full_audit_disk_refuses_requests_then_recovers(cli: Cli,
                                                        standins: dict[str, StandIn]) -> None:
    """A full audit disk makes every request 503 (even a reused lease); freeing space heals it."""
    openai = standins["openai"]
    grants = grant_to("openai_api_key", openai.host, delivery='"native", "http_header_inject"')
    with tmpfs("1m") as mnt:
        b = launch(cli, {"openai": openai}, grants=grants,
                   before_start=lambda: move_audit_log(cli.home, mnt))
        try:
            assert b.post("openai", "v1/embeddings").status == 200  # the lease now exists
            filler = fill(mnt)
            for _ in range(3):
                reply = b.post("openai", "v1/embeddings")
                assert (reply.status, reply.code) == (503, "audit_unavailable")
            lease = b.http("POST", "/v1/leases", body=NATIVE)
            assert (lease.status, lease.code) == (503, "audit_unavailable")
            assert CANARY not in lease.body.decode()
            assert len(openai.requests) == 1
            filler.unlink()
            assert b.post("openai", "v1/embeddings").status == 200
            assert b.http("POST", "/v1/leases", body=NATIVE).status == 201
        finally:
            b.stop()
        assert b.events("audit.resumed")
        served = [e for e in b.events("proxy.request") if e.get("status") == 200]
        assert len(served) == len(openai.requests) == 2  # every served request is on record
        verify_audit(cli)


def test_unwritable_audit_log_refuses_every_decision(cli: Cli,
                                                     standins: dict[str, StandIn]) -> None:
    """An audit log refusing writes (EPERM) under a running daemon: every decision is 503."""
    openai = standins["openai"]
    with ext4_image() as mnt:
        b = launch(cli, {"openai": openai}, before_start=lambda: move_audit_log(cli.home, mnt))
        log = mnt / "audit.log"
        try:
            subprocess.run(["chattr", "+i", str(log)], check=True)
            for _ in range(2):
                reply = b.post("openai", "v1/embeddings")
                assert (reply.status, reply.code) == (503, "audit_unavailable")
            assert b.http("GET", "/v1/health", token="sbt_wrong").status == 503
            assert b.http("GET", "/v1/health", headers=[("Host", "evil.example")]).status == 503
            assert openai.requests == []
            subprocess.run(["chattr", "-i", str(log)], check=True)
            assert b.post("openai", "v1/embeddings").status == 200
        finally:
            subprocess.run(["chattr", "-i", str(log)], check=False)
            b.stop()
        assert [e["event"] for e in b.events()][-4:-1] == ["audit.resumed", "lease.issued",
                                                           "proxy.request"]
        verify_audit(cli)


def test_read_only_audit_disk_refuses_to_start_and_refuses_changes(cli: Cli) -> None:
    """With the audit log on a read-only disk the daemon will not start and `add` stores nothing."""
    with tmpfs("1m") as mnt:
        move_audit_log(cli.home, mnt)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        serve = cli("serve", "--listen", "127.0.0.1:0", timeout=60)
        assert serve.returncode == 1
        assert "audit log" in serve.stderr and "Read-only file system" in serve.stderr
        assert not (cli.home / "run" / "broker.sock").exists()
        add = cli("add", "@late", "--provider", "openai", "--kind", "api_key", "--stdin",
                  input=CANARY_2)
        assert add.returncode != 0 and "audit log" in add.stderr
        assert "late" not in cli.ok("list")
        assert not list((cli.home / "vault").glob("s-late*"))
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        verify_audit(cli)


# --- the vault under a running daemon -----------------------------------------------------------


def test_vault_file_damaged_after_rotation_is_503_without_a_leak(gateway: Broker) -> None:
    """A vault file damaged after a rotation is 503 secret_unavailable: no crash, no leak."""
    # Decided behaviour: the daemon keeps the current version's value in memory after first
    # use, so deleting its file does not revoke it (`remove` does); a new version is read.
    b, openai = gateway, gateway.standins["openai"]
    vault = b.cli.home / "vault" / "s-openai_api_key.sbv"
    assert b.post("openai", "v1/embeddings").status == 200
    vault.unlink()
    assert b.post("openai", "v1/embeddings").status == 200  # the cached, current value
    b.cli.ok("rotate", "@openai_api_key", "--stdin", input=real_key("openai") + "-v2")
    good = vault.read_bytes()
    damaged = {
        "deleted": None,
        "truncated": good[:20],
        "bit flipped": good[:-1] + bytes([good[-1] ^ 1]),
        "another ref's file": (b.cli.home / "vault" / "s-jina_api_key.sbv").read_bytes(),
        "garbage": b"\x00" * len(good),
    }
    consumer = json.loads(b.cli.ok("token", "create", "--consumer", "default", "--json"))
    owner_told: list[str] = []
    for what, blob in damaged.items():
        if blob is None:
            vault.unlink(missing_ok=True)
        else:
            vault.write_bytes(blob)
        replies = [b.post("openai", "v1/embeddings", token=t) for t in ("owner", consumer["token"])]
        assert [(r.status, r.code) for r in replies] == [(503, "secret_unavailable")] * 2, what
        told_owner, told_consumer = (r.json()["error"]["message"] for r in replies)
        owner_told.append(told_owner)
        assert told_owner.startswith("the value of @openai_api_key cannot be read: "), what
        # The why may name files in the home: the owner is told, a consumer only pointed
        # at the log.
        assert told_consumer == ("the value of @openai_api_key cannot be read; the broker's "
                                 "log says why"), what
        assert b.daemon.proc.poll() is None
    assert len(openai.requests) == 2
    openai.expected_key = real_key("openai") + "-v3"
    b.cli.ok("rotate", "@openai_api_key", "--stdin", input=openai.expected_key)
    assert b.post("openai", "v1/embeddings").status == 200
    assert openai.last.headers["authorization"] == f"Bearer {openai.expected_key}"
    withheld = [json.loads(line) for line in b.log().splitlines() if "detail_withheld" in line]
    assert [e["detail"] for e in withheld] == [m.split(": ", 1)[1] for m in owner_told]
    bodies = [r.body.decode(errors="replace") for r in b.replies]
    assert scan([*bodies, b.log()], CANARY) == []


def test_vault_file_restored_from_an_old_copy_is_refused(gateway: Broker) -> None:
    """A vault file restored from an old copy decrypts, but its retired value is refused."""
    b, openai = gateway, gateway.standins["openai"]
    vault = b.cli.home / "vault" / "s-openai_api_key.sbv"
    retired = vault.read_bytes()
    openai.expected_key = real_key("openai") + "-new"
    b.cli.ok("rotate", "@openai_api_key", "--stdin", input=openai.expected_key)
    assert b.post("openai", "v1/embeddings").status == 200
    b.stop()
    vault.write_bytes(retired)  # a backup restored over the vault
    d = start_daemon(b.cli.home, b.cli.env)
    try:
        reply = Broker(b.cli, d, b.standins).post("openai", "v1/embeddings")
        assert (reply.status, reply.code) == (503, "secret_unavailable")
        assert "rotate @openai_api_key" in reply.json()["error"]["message"]
    finally:
        kill(d)
    assert len(openai.requests) == 1  # the retired key never left
    assert all(real_key("openai") + "-new" in r.headers["authorization"] for r in openai.requests)
    exec_run = b.cli("exec", "--env", "K=@openai_api_key", "--", "true")
    assert exec_run.returncode == 5 and "rotate @openai_api_key" in exec_run.stderr


# --- SIGKILL ------------------------------------------------------------------------------------


def test_sigkill_mid_request_loses_no_acknowledged_audit_event(gateway: Broker) -> None:
    """SIGKILL mid-stream loses no acknowledged audit event; the chain verifies and goes on."""
    # Batch fsync: the metadata checkpoint may lag the file by up to 100 ms, which verify
    # accepts (a log longer than its checkpoint); a log shorter than it would fail.
    b, openai = gateway, gateway.standins["openai"]
    assert b.post("openai", "v1/embeddings").status == 200
    for i in range(3):
        assert b.http("GET", "/v1/health", token=f"sbt_wrong{i}").status == 401
    for _ in range(2):
        assert b.http("GET", "/v1/health", headers=[("Host", "evil.example")]).status == 403
    assert b.post("openai", "v1/embeddings", headers=[("X-Broker-Consumer", "nobody")]
                  ).status == 403
    wait_for(lambda: len(b.events("proxy.request")) == 2, what="the after-the-fact records")
    acknowledged = (b.cli.home / "audit.log").read_bytes()
    openai.chunk_delay, openai.n_chunks = 0.2, 50
    cut: list[bytes] = []

    def stream() -> None:
        try:
            cut.append(exchange(b.port, request_bytes(
                b.port, "POST", "/proxy/openai/v1/chat/completions",
                [("Authorization", f"Bearer {b.token}")], STREAM)))
        except OSError as exc:
            cut.append(repr(exc).encode())

    caller = threading.Thread(target=stream)
    caller.start()
    wait_for(lambda: openai.sent_at, what="the first streamed chunk")
    os.kill(b.daemon.proc.pid, signal.SIGKILL)
    assert b.daemon.proc.wait(10) == -signal.SIGKILL
    caller.join(10)
    assert cut and not cut[0].endswith(b"0\r\n\r\n")  # the in-flight stream was cut
    after = (b.cli.home / "audit.log").read_bytes()
    assert after.startswith(acknowledged)
    kinds = Counter(e["event"] for e in b.events())
    # A window's first refusal is written at once; the rest are counted in memory until the
    # window closes, so SIGKILL loses those counts (never an acknowledged line).
    assert (kinds["auth.failed"], kinds["request.refused"], kinds["lease.denied"]) == (1, 1, 1)
    assert kinds["lease.issued"] == 2  # the stream's decision was recorded before it went out
    assert kinds["broker.stopped"] == 0
    verify_audit(b.cli)
    d = start_daemon(b.cli.home, b.cli.env)
    try:
        assert Broker(b.cli, d, b.standins).post("openai", "v1/embeddings").status == 200
        d.stop()
    finally:
        kill(d)
    kinds = Counter(e["event"] for e in b.events())
    assert (kinds["broker.started"], kinds["broker.stopped"]) == (2, 1)
    verify_audit(b.cli)


# --- the grants file rewritten under the daemon -------------------------------------------------


def reload_and_wait(b: Broker, valid: bool) -> dict[str, object]:
    os.kill(b.daemon.proc.pid, signal.SIGHUP)
    unix = BrokerClient(socket_path=b.cli.home / "run" / "broker.sock")
    return dict(wait_for(lambda: (s := unix.status())["grants"]["valid"] == valid and s,
                         what=f"grants valid={valid}"))


def test_half_written_grants_fail_closed_and_the_finished_file_recovers(gateway: Broker) -> None:
    """A grants file caught half-written denies everything; the finished file restores access."""
    b = gateway
    path = b.cli.home / "secrets.grants.toml"
    full = path.read_text()
    assert b.post("openai", "v1/embeddings").status == 200
    cut = full.index('consumer = "def') + len('consumer = "def')
    with path.open("w") as f:
        f.write(full[:cut])
        f.flush()
        os.fsync(f.fileno())
        reload_and_wait(b, valid=False)
        assert b.post("openai", "v1/embeddings").status == 403
        assert b.events("lease.revoked")[-1]["reason"] == "grants file invalid"
        f.write(full[cut:])
    reload_and_wait(b, valid=True)
    assert b.post("openai", "v1/embeddings").status == 200
    assert b.events("grants.invalid")
    assert len(b.standins["openai"].requests) == 2


def test_grants_rewritten_under_load_never_widen_access(cli: Cli,
                                                        standins: dict[str, StandIn]) -> None:
    """Grants rewritten under load, atomically or in place, never serve an ungranted consumer."""
    openai = standins["openai"]
    base = grant_to("openai_api_key", openai.host, consumer="worker")
    wider = base + grant_to("openai_api_key", openai.host, consumer="helper")
    b = launch(cli, {"openai": openai}, grants=base)
    path = cli.home / "secrets.grants.toml"
    stop = threading.Event()
    seen: dict[str, list[int]] = {"worker": [], "intruder": []}

    def hammer(consumer: str) -> None:
        while not stop.is_set() and len(seen[consumer]) < 400:
            reply = b.post("openai", "v1/embeddings", headers=[("X-Broker-Consumer", consumer)])
            seen[consumer].append(reply.status)

    callers = [threading.Thread(target=hammer, args=(c,))
               for c in ("worker", "worker", "intruder")]
    try:
        for t in callers:
            t.start()
        for i in range(12):
            text = wider if i % 2 else base
            if i % 3:
                write_grants(cli.home, text)
                continue
            cut = text.index('consumer = "wor') + len('consumer = "wor')
            with path.open("w") as f:  # in place: truncate, then write in two parts
                f.write(text[:cut])
                f.flush()
                reload_and_wait(b, valid=False)
                f.write(text[cut:])
            reload_and_wait(b, valid=True)
    finally:
        stop.set()
        for t in callers:
            t.join(30)
    try:
        write_grants(cli.home, base)
        reload_and_wait(b, valid=True)
        assert b.post("openai", "v1/embeddings", headers=[("X-Broker-Consumer", "worker")]
                      ).status == 200
    finally:
        b.stop()
    assert seen["intruder"] and set(seen["intruder"]) == {403}
    assert seen["worker"] and set(seen["worker"]) <= {200, 403}
    served = [e for e in b.events("proxy.request") if e.get("status") == 200]
    assert {e["consumer"] for e in served} == {"worker"}
    assert len(served) == len(openai.requests) == seen["worker"].count(200) + 1
    assert not [e for e in b.events("lease.issued") if e["consumer"] == "intruder"]
    assert len(b.events("grants.invalid")) >= 4
