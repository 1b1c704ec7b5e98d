"""Tokens under attack: brute force, malformed tokens, rotation, consumer spoofing."""

from __future__ import annotations

import http.client
import json
from typing import Any

from broker.client import BrokerClient
from tests.conftest import Cli, grant, scan
from tests.support.gateway import Broker, exchange, launch, parse
from tests.support.standins import StandIn

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def failures_logged(gateway: Broker) -> list[dict[str, Any]]:
    """The daemon's `auth.failed` log events, in order."""
    return [json.loads(line) for line in gateway.log().splitlines() if '"auth.failed"' in line]


def refusals(events: list[dict[str, Any]]) -> int:
    """How many refusals some audit lines stand for (a line with `count` stands for more)."""
    return sum(e.get("count", 1) for e in events)


def test_brute_force_is_audited_and_slowed_across_every_loopback_address(gateway: Broker) -> None:
    """Wrong tokens from many 127/8 addresses are audited and slowed as one; owners never wait."""
    # No timing: the daemon logs the first failure at once and the rest of its window, with
    # the longest delay it imposed, as one line at shutdown: 5 free failures, then 10 ms
    # doubling, so the 12th waited 640 ms; the owner's requests add nothing.
    for i in range(12):
        reply = gateway.http("GET", "/v1/health", token=f"sbt_guess{i}", source=f"127.0.0.{2 + i}")
        assert (reply.status, reply.code) == (401, "unauthorized")
        if i == 8:  # deep in the slowed phase: the owner is not held back, nor counted
            assert gateway.http("GET", "/v1/health", source="127.0.0.10").status == 200
            assert gateway.post("openai", "v1/embeddings").status == 200
    gateway.stop()
    logged = failures_logged(gateway)
    assert [(t.get("count"), t["delay_ms"]) for t in logged] == [(None, 0), (11, 640)]
    failed = gateway.events("auth.failed")
    assert [e["peer"] for e in failed] == ["127.0.0.2", "127.0.0.2"]  # the window's first
    assert refusals(failed) == 12
    assert {e["reason"] for e in failed} == {"invalid"}
    assert not scan([gateway.log(), json.dumps(failed)], *(f"sbt_guess{i}" for i in range(12)))


def test_malformed_tokens_are_401_audited_never_500(gateway: Broker) -> None:
    """Non-UTF-8 bytes, a bare scheme, other schemes and near-misses are plain 401s."""
    port, good = gateway.port, gateway.token.encode()
    variants = [b"Bearer \xff\xfe\xfd", b"Bearer " + good[:-1] + b"\xe9", b"Bearer",
                b"Basic " + good, b"Token " + good, b"Bearer " + good + b"x",
                b"Bearer " + good[:-1], b"Bearer x" + good, b"sbt_"]
    for value in variants:
        reply = parse(exchange(port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Authorization: " + value + b"\r\nConnection: close\r\n\r\n"))
        assert (reply.status, reply.code) == (401, "unauthorized"), value
    lower = parse(exchange(port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Authorization: bearer " + good + b"\r\nConnection: close\r\n\r\n"))
    assert lower.status == 200  # the scheme is case-insensitive, the token is not
    gateway.stop()  # writes the counts of the refusals' open windows
    assert refusals(gateway.events("auth.failed")) == len(variants)
    assert "Traceback" not in gateway.log()


def test_rotation_ends_the_old_token_at_once_even_on_an_open_connection(gateway: Broker) -> None:
    """`token rotate` ends the old token at once, even on an open keep-alive connection."""
    old = gateway.token
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)

    def get(path: str, token: str, body: bytes | None = None) -> int:
        conn.request("POST" if body else "GET", path, body=body,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status

    assert get("/v1/health", old) == 200
    assert conn.sock is not None
    local = conn.sock.getsockname()
    gateway.cli.ok("token", "rotate")
    assert get("/v1/health", old) == 401
    assert get("/proxy/openai/v1/embeddings", old, b'{"model":"m","input":"a"}') == 401
    new = (gateway.cli.home / "broker.token").read_text().strip()
    assert new != old and get("/v1/health", new) == 200
    assert conn.sock is not None and conn.sock.getsockname() == local  # one connection
    conn.close()
    assert gateway.upstream_count() == 0
    gateway.stop()
    events = gateway.events()
    rotated = max(i for i, e in enumerate(events) if e["event"] == "token.rotated")
    assert refusals([e for e in events[rotated:] if e["event"] == "auth.failed"]) == 2


def test_consumer_spoofing_gains_nothing_a_grant_does_not_give(cli: Cli,
                                                               standins: dict[str, StandIn]
                                                               ) -> None:
    """A named or spoofed consumer gets exactly its own grants; a consumer token names no other."""
    openai = standins["openai"]
    grants = grant("openai_api_key", "agent-a", purposes='"llm.chat"',
                   delivery='"http_header_inject"', hosts=f'"{openai.host}"')
    b = launch(cli, {"openai": openai}, grants=grants)

    def chat(*headers: tuple[str, str],
             token: str = "owner") -> tuple[int, str | None]:  # noqa: S107 - which token
        reply = b.post("openai", "v1/chat/completions", CHAT, headers=headers, token=token)
        return reply.status, reply.code

    try:
        assert chat(("X-Broker-Consumer", "agent-a")) == (200, None)
        assert chat() == (403, "grant_denied")  # default has no grant
        assert b.post("openai", "v1/embeddings", headers=[("X-Broker-Consumer", "agent-a")]
                      ).status == 403  # agent-a may chat, not embed
        for name in ("AGENT-A", "agent-a.", "agent-b"):
            assert chat(("X-Broker-Consumer", name)) == (403, "grant_denied"), name
        for name in ("agent-a,default", "agent a", "", "a" * 129):
            assert chat(("X-Broker-Consumer", name)) == (400, "invalid_request"), name
        assert chat(("X-Broker-Consumer", "agent-a"),
                    ("X-Broker-Consumer", "default")) == (400, "invalid_request")
        raw = parse(exchange(b.port, b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\n"
                             b"Host: 127.0.0.1\r\nAuthorization: Bearer " + b.token.encode()
                             + b"\r\nX-Broker-Consumer: agent\xe2\x80\x90a\r\nContent-Length: "
                             + str(len(CHAT)).encode() + b"\r\nConnection: close\r\n\r\n" + CHAT))
        assert (raw.status, raw.code) == (400, "invalid_request")  # a Unicode hyphen
        native = b.http("POST", "/v1/leases", headers=[("X-Broker-Consumer", "agent-a")],
                        body=b'{"secret_ref": "openai_api_key", "purpose": "llm.chat", '
                             b'"delivery": "native"}')
        assert (native.status, native.code) == (403, "grant_denied")
        assert "value" not in native.json()
        owner = BrokerClient(socket_path=cli.home / "run" / "broker.sock")
        agent = owner.request("POST", "/v1/admin/tokens", {"consumer": "agent-a"})["token"]
        assert chat(token=agent) == (200, None)
        assert chat(("X-Broker-Consumer", "agent-a"), token=agent) == (200, None)
        assert chat(("X-Broker-Consumer", "default"), token=agent) == (403, "consumer_mismatch")
        admin = b.http("GET", "/v1/admin/secrets", token=agent)
        assert (admin.status, admin.code) == (403, "owner_only")
        assert len(openai.requests) == 3  # exactly the three granted chats
        served = [e for e in b.events("proxy.request") if e.get("status") == 200]
        assert [e["consumer"] for e in served] == ["agent-a"] * 3
    finally:
        b.stop()
