"""The daemon as a real process: transports, tokens, guards, leases, reloads, lifecycle."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.core.errors import BrokerNotRunning, Denied, SecretNotFound, Unauthorized
from tests.conftest import CANARY, CANARY_2, Cli, grant, scan, wait_for, write_grants


def raw_request(port: int, method: str, path: str, headers: dict[str, str],
                body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """An HTTP request with exactly these headers (http.client adds only Host unless told)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def audit_events(cli: Cli, event: str) -> list[dict[str, Any]]:
    return list(json.loads(cli.ok("audit", "--event", event, "--json"))["events"])


@pytest.fixture
def granted(cli: Cli) -> Cli:
    cli.add("@openai_api_key", CANARY)
    write_grants(cli.home, grant("openai_api_key") + grant("openai_api_key", consumer="agent-a",
                                                            purposes='"llm.chat"'))
    return cli


def test_health_on_both_transports(granted: Cli, daemon_factory: Any) -> None:
    """The Unix socket needs no token; TCP answers with the bootstrap token."""
    d = daemon_factory()
    assert d.client(unix=True).health()["status"] == "ok"
    assert d.client().health()["status"] == "ok"
    assert (d.home / "run" / "broker.sock").stat().st_mode & 0o777 == 0o600
    assert (d.home / "run").stat().st_mode & 0o777 == 0o700


def test_missing_wrong_and_rotated_tokens_are_401_and_audited(granted: Cli,
                                                              daemon_factory: Any) -> None:
    """No token, a wrong token and a rotated-away token are all refused with 401."""
    d = daemon_factory()
    for token in ("", "sbt_wrong"):
        with pytest.raises(Unauthorized):
            d.client(token=token).health()
    old = d.token
    granted.ok("token", "rotate")
    with pytest.raises(Unauthorized):
        d.client(token=old).health()
    new = (d.home / "broker.token").read_text().strip()
    assert d.client(token=new).health()["status"] == "ok"
    assert d.stop() == 0  # writes the count of the refusals' open windows
    failures = audit_events(granted, "auth.failed")
    # One line per peer and reason at once, the rest of its window as one line with a count.
    assert [(e["reason"], e.get("count")) for e in failures] == [
        ("missing", None), ("invalid", None), ("invalid", 1)]
    assert not scan(granted.home.joinpath("audit.log").read_text(), old, new)


def test_a_token_file_replaced_by_hand_is_read_within_a_second(granted: Cli,
                                                                daemon_factory: Any) -> None:
    """`token rotate` is noticed at once (metadata.db's generation); a broker.token written
    by hand (restored from a backup, say) on the next once-a-second check."""
    d = daemon_factory()
    old, new = d.token, "sbt_" + "h" * 43
    path = d.home / "broker.token"
    path.write_text(new + "\n")

    def refused(token: str) -> bool:
        try:
            d.client(token=token).health()
        except Unauthorized:
            return True
        return False

    wait_for(lambda: refused(old), timeout=5, what="the old token to be refused")
    assert d.client(token=new).health()["status"] == "ok"


@pytest.mark.parametrize("headers, code", [
    ({"Host": "evil.example:28443"}, "host_header_refused"),
    ({"Host": "127.0.0.1.nip.io"}, "host_header_refused"),
    ({"Origin": "http://evil.example"}, "origin_not_allowed"),
    ({"Origin": "null"}, "origin_not_allowed"),
])
def test_foreign_host_and_origin_refused_before_auth(granted: Cli, daemon_factory: Any,
                                                     headers: dict[str, str], code: str) -> None:
    """DNS rebinding and cross-site requests get 403 whatever token they carry."""
    d = daemon_factory()
    sent = {"Host": f"127.0.0.1:{d.port}", "Authorization": f"Bearer {d.token}", **headers}
    status, body = raw_request(d.port, "GET", "/v1/health", sent)
    assert (status, body["error"]["code"]) == (403, code)
    assert audit_events(granted, "request.refused")[-1]["reason"] == code


def test_lease_issue_list_revoke(granted: Cli, daemon_factory: Any) -> None:
    """A granted native lease returns the value; listing never does; revoke ends it."""
    d = daemon_factory()
    c = d.client()
    lease = c.lease("@openai_api_key", "llm.chat", "native")
    assert lease["value"] == CANARY and lease["lease_id"].startswith("lse_")
    assert lease["ttl_secs"] == 300
    listed = c.leases()
    assert [x["lease_id"] for x in listed] == [lease["lease_id"]]
    assert CANARY not in json.dumps(listed)
    c.revoke(lease["lease_id"])
    assert lease["lease_id"] not in [x["lease_id"] for x in c.leases()]
    revoked = audit_events(granted, "lease.revoked")
    assert revoked[-1]["lease_id"] == lease["lease_id"]


def test_denied_and_unknown_leases(granted: Cli, daemon_factory: Any) -> None:
    """Deny by default: an ungranted purpose or consumer is 403; an unknown ref is 404."""
    c = daemon_factory().client()
    with pytest.raises(Denied) as denied:
        c.lease("@openai_api_key", "llm.rerank", "native")
    assert "llm.rerank" in str(denied.value)
    with pytest.raises(Denied):
        c.lease("@openai_api_key", "llm.embeddings", "native", consumer="agent-a")
    with pytest.raises(SecretNotFound):
        c.lease("@nope", "llm.chat", "native")
    assert audit_events(granted, "lease.denied")


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"secret_ref": 1, "purpose": "x", '
                                  b'"delivery": "native"}',
                                  b'{"secret_ref": "a", "purpose": "x", "delivery": "fax"}',
                                  b'{"secret_ref": "a", "purpose": "x", "delivery": "native", '
                                  b'"extra": 1}'])
def test_malformed_lease_requests_are_400(granted: Cli, daemon_factory: Any, body: bytes) -> None:
    """Malformed JSON or fields on the lease API give 400 invalid_request."""
    d = daemon_factory()
    status, doc = raw_request(d.port, "POST", "/v1/leases",
                              {"Authorization": f"Bearer {d.token}",
                               "Content-Type": "application/json"}, body)
    assert (status, doc["error"]["code"]) == (400, "invalid_request")


def test_grants_file_change_and_sighup_take_effect(granted: Cli, daemon_factory: Any) -> None:
    """Removing a grant revokes its leases on change; SIGHUP reloads too."""
    d = daemon_factory()
    c = d.client()
    lease = c.lease("@openai_api_key", "llm.chat", "native", consumer="agent-a")
    write_grants(d.home, grant("openai_api_key"))  # agent-a's grant is gone

    def revoked() -> bool:
        return lease["lease_id"] not in [x["lease_id"] for x in c.leases()]

    wait_for(revoked, timeout=5, what="the removed grant's lease to be revoked")
    with pytest.raises(Denied):
        c.lease("@openai_api_key", "llm.chat", "native", consumer="agent-a")
    # Same size, same second: only SIGHUP is sure to notice; it must.
    (d.home / "secrets.grants.toml").write_text(grant("openai_api_key", consumer="agent-b"))
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: c.status()["grants"]["count"] == 1 and _allowed(c, "agent-b"),
             timeout=5, what="SIGHUP reload")


def _allowed(c: BrokerClient, consumer: str) -> bool:
    try:
        c.lease("@openai_api_key", "llm.chat", "native", consumer=consumer)
    except Denied:
        return False
    return True


def test_invalid_grants_fail_closed_until_fixed(granted: Cli, daemon_factory: Any) -> None:
    """A typo in the grants file denies everything, is audited, and a fix restores access."""
    d = daemon_factory()
    c = d.client()
    assert _allowed(c, "default")
    write_grants(d.home, grant("openai_api_key").replace("purposes", "purpose"))
    wait_for(lambda: not c.status()["grants"]["valid"], timeout=5, what="invalid grants")
    assert "purpose" in c.status()["grants"]["error"]
    assert not _allowed(c, "default")
    assert audit_events(granted, "grants.invalid")
    write_grants(d.home, grant("openai_api_key"))
    wait_for(lambda: c.status()["grants"]["valid"], timeout=5, what="valid grants again")
    assert _allowed(c, "default")


def test_rotation_reaches_the_running_daemon(granted: Cli, daemon_factory: Any) -> None:
    """After `rotate`, the next lease carries the new value and old leases are revoked."""
    d = daemon_factory()
    c = d.client()
    old = c.lease("@openai_api_key", "llm.chat", "native")
    granted.ok("rotate", "@openai_api_key", "--stdin", input=CANARY_2)
    assert c.resolve("@openai_api_key", "llm.chat") == CANARY_2
    assert old["lease_id"] not in [x["lease_id"] for x in c.leases()]
    granted.ok("remove", "@openai_api_key")
    with pytest.raises(SecretNotFound):
        c.resolve("@openai_api_key", "llm.chat")


def test_client_library_over_both_transports(granted: Cli, daemon_factory: Any) -> None:
    """`broker.client` resolves over the socket and TCP, found through the environment."""
    d = daemon_factory()
    over_tcp = BrokerClient.from_env({"SECRET_BROKER_URL": d.url, "SECRET_BROKER_TOKEN": d.token})
    over_unix = BrokerClient.from_env({"SECRET_BROKER_HOME": str(d.home)})
    for client in (over_tcp, over_unix):
        assert client.resolve("@openai_api_key", "llm.chat") == CANARY
    d.stop()
    with pytest.raises(BrokerNotRunning) as exc:
        over_unix.health()
    assert exc.value.exit_code == 6


def test_start_status_stop_from_the_cli(granted: Cli) -> None:
    """`start` waits until it answers, `status` reports, `stop` ends it; exit 6 when stopped
    (and where there is no home at all, `status` says to run `init` first)."""
    stopped = granted("status")
    assert stopped.returncode == 6 and "start it with `secret-broker start`" in stopped.stderr
    nowhere = granted("status", env={"SECRET_BROKER_HOME": str(granted.home / "none")})
    assert nowhere.returncode == 6
    assert "there is no home there yet: run `secret-broker init`" in nowhere.stderr
    out = granted.ok("start", "--listen", "127.0.0.1:0")
    assert "running" in out
    status = json.loads(granted.ok("status", "--json"))
    assert status["grants"]["valid"] and status["backend"] == "file-vault"
    assert "running: pid" in granted.ok("status")
    granted.ok("stop")
    assert granted("status").returncode == 6
    assert granted("stop").returncode == 6


def test_second_daemon_on_same_home_refused(granted: Cli, daemon_factory: Any) -> None:
    """A second `serve` on the same home exits with a clear error, the first keeps running."""
    d = daemon_factory()
    second = granted("serve", "--listen", "127.0.0.1:0")
    assert second.returncode == 1 and "already running" in second.stderr
    assert d.client().health()["status"] == "ok"


def test_non_loopback_listen_needs_a_flag(granted: Cli) -> None:
    """Binding beyond loopback is refused unless --allow-remote is given."""
    proc = granted("serve", "--listen", "0.0.0.0:0")
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr


def test_sigterm_exits_zero_and_is_audited(granted: Cli, daemon_factory: Any) -> None:
    """SIGTERM stops the broker gracefully with exit 0; start and stop are audited."""
    d = daemon_factory()
    assert d.stop() == 0
    events = [e["event"] for e in json.loads(granted.ok("audit", "--json"))["events"]]
    assert events.count("broker.started") == 1 and events[-1] == "broker.stopped"
    assert granted.ok("audit", "verify")


def test_batch_audit_is_checkpointed_while_running(granted: Cli, daemon_factory: Any) -> None:
    """In batch mode the running daemon checkpoints its lines (no stop needed), so after a
    kill -9 cutting the newest line off the log is still caught."""
    d = daemon_factory()
    d.client().lease("@openai_api_key", "llm.chat", "native")
    log = granted.home / "audit.log"
    last = json.loads(log.read_bytes().splitlines()[-1])
    assert last["event"] == "lease.issued"

    def checkpointed() -> bool:
        db = sqlite3.connect(granted.home / "metadata.db")
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'audit_seq'").fetchone()
        finally:
            db.close()
        return row is not None and int(row[0]) >= last["seq"]

    wait_for(checkpointed, what="the audit checkpoint to reach the newest line")
    d.proc.kill()
    d.proc.wait()
    assert granted.ok("audit", "verify")
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    cut = granted("audit", "verify")
    assert cut.returncode == 1 and "Traceback" not in cut.stderr
    assert "cut" in (cut.stdout + cut.stderr).lower(), cut.stdout + cut.stderr


def test_session_logs_and_audit_hold_no_canary(granted: Cli, daemon_factory: Any) -> None:
    """A whole session's daemon log, audit log and CLI output never contain a value or token."""
    d = daemon_factory()
    c = d.client()
    c.resolve("@openai_api_key", "llm.chat")
    with pytest.raises(Unauthorized):
        d.client(token=CANARY_2).health()
    d.stop()
    texts = [d.log(), (d.home / "audit.log").read_text(), *granted.outputs]
    assert scan(texts, CANARY, CANARY_2, d.token) == []

