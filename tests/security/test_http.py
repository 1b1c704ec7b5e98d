"""Hostile HTTP against one running broker: rebinding, cross-site, traversal, smuggling,
oversized and slow requests, malformed JSON and smuggled credentials.

Every attack is checked twice: the reply is the refusal the SPEC names, and the provider
stand-ins saw nothing (or only the request that was meant). The daemon must keep serving.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote_plus

import aiohttp.http_exceptions
import pytest

from tests.conftest import Cli
from tests.support.gateway import (
    EMBED,
    GEMINI,
    Broker,
    Reply,
    kill,
    launch,
    parse,
    real_key,
    start_standins,
    stop_standins,
)
from tests.support.sdk_clients import openai_client

GEMINI_PATH = "v1beta/models/gemini-2.0-flash:generateContent"


@pytest.fixture(scope="module")
def shared(module_home: Cli) -> Iterator[Broker]:
    stands = start_standins()
    b = launch(module_home, stands, extra="[limits]\nmax_body_bytes = 65536\n")
    yield b
    kill(b.daemon)
    stop_standins(stands)


def assert_no_handler_crashed(gw: Broker) -> None:
    """Only the HTTP parser may have refused something; no handler raised (a 500)."""
    assert "Traceback" not in gw.log()
    for line in gw.log().splitlines():
        if '"internal.error"' in line:
            name = json.loads(line)["error"]
            kind = getattr(aiohttp.http_exceptions, name, None)
            assert isinstance(kind, type) and issubclass(
                kind, aiohttp.http_exceptions.HttpProcessingError), line


def assert_still_serves(gw: Broker) -> None:
    before = len(gw.standins["openai"].requests)
    reply = gw.post("openai", "v1/embeddings")
    assert reply.status == 200, reply.body
    assert len(gw.standins["openai"].requests) == before + 1


# --- DNS rebinding and cross-site ---------------------------------------------------------------

FOREIGN_HOSTS = ["evil.example", "evil.example:28443", "127.0.0.1.nip.io",
                 "localhost.evil.example", "127.0.0.1@evil.example",
                 "0.0.0.0", ""]  # noqa: S104 - a Host header value, nothing binds it
ROUTES = [("GET", "/v1/health"), ("GET", "/v1/status"), ("POST", "/v1/leases"),
          ("POST", "/proxy/openai/v1/embeddings"), ("GET", "/nowhere")]


def test_foreign_host_is_refused_before_auth_on_every_route(gw: Broker) -> None:
    """A rebinding page's Host is 403 on every route, whatever token it carries; audited."""
    before = len(gw.events("request.refused"))
    cases = [(host, method, target, token) for host in FOREIGN_HOSTS
             for method, target in ROUTES for token in ("owner", "sbt_wrong", None)]

    def send(host: str, method: str, target: str, token: str | None) -> Reply:
        return gw.http(method, target, headers=[("Host", host)], token=token,
                       body=EMBED if method == "POST" else None)

    # At once: every refusal is slowed (up to 2 s each), and delays overlap.
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: send(*case), cases))
    for case, reply in zip(cases, replies, strict=True):
        assert (reply.status, reply.code) == (403, "host_header_refused"), case
    missing = parse(gw.raw(b"GET /v1/health HTTP/1.0\r\nAuthorization: Bearer "
                           + gw.token.encode() + b"\r\n\r\n"))
    assert (missing.status, missing.code) == (403, "host_header_refused")
    doubled = gw.raw(f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                     f"Authorization: Bearer {gw.token}\r\n\r\n".encode())
    assert parse(doubled).status == 400
    # Audited once per window at once, the rest counted (written when the window closes:
    # tests/security/test_review_flood.py checks that the counts add up).
    refused = gw.events("request.refused")
    assert len(refused) - before <= 2
    assert {e["reason"] for e in refused[before:]} <= {"host_header_refused"}
    assert "host_header_refused" in {e["reason"] for e in refused}
    assert gw.upstream_count() == 0
    ok = gw.http("GET", "/v1/health", headers=[("Host", f"LOCALHOST:{gw.port}")])
    assert ok.status == 200  # the control: a loopback name in any case is fine


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost",
                                    "http://127.0.0.1:{port}", ""])
def test_any_origin_is_refused_even_the_daemons_own(gw: Broker, origin: str) -> None:
    """Outside /ui/ an Origin means a web page sent it: 403, before the token is looked at."""
    def send(method: str, target: str) -> Reply:
        return gw.http(method, target, headers=[("Origin", origin.format(port=gw.port))],
                       body=EMBED if method == "POST" else None)

    with ThreadPoolExecutor(len(ROUTES)) as pool:  # at once: each refusal is slowed
        replies = list(pool.map(lambda route: send(*route), ROUTES))
    for (_method, target), reply in zip(ROUTES, replies, strict=True):
        assert (reply.status, reply.code) == (403, "origin_not_allowed"), target
    assert gw.upstream_count() == 0


def test_cors_preflight_gets_no_cors_grant(gw: Broker) -> None:
    """A preflight is refused and no reply ever carries an Access-Control-* header."""
    preflight = [("Origin", "http://evil.example"), ("Access-Control-Request-Method", "POST"),
                 ("Access-Control-Request-Headers", "authorization, content-type")]
    targets = ("/proxy/openai/v1/embeddings", "/v1/leases", "/v1/health")
    with ThreadPoolExecutor(len(targets)) as pool:  # at once: each refusal is slowed
        replies = list(pool.map(
            lambda target: gw.http("OPTIONS", target, headers=preflight, token=None), targets))
    assert [(r.status, r.code) for r in replies] == [(403, "origin_not_allowed")] * 3
    replies += [gw.http("OPTIONS", "/proxy/openai/v1/embeddings"),
                gw.http("GET", "/v1/health"), gw.post("openai", "v1/embeddings")]
    assert [r.status for r in replies[3:]] == [405, 200, 200]
    for reply in replies:
        assert not [h for h in reply.headers if h.startswith("access-control-")], reply.headers


# --- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "/proxy/openai/v1/../v1/chat/completions",
    "/proxy/openai/v1/%2e%2e/v1/chat/completions",
    "/proxy/openai/v1/%2E%2E/v1/chat/completions",
    "/proxy/openai/v1/.%2e/v1/chat/completions",
    "/proxy/openai/./v1/embeddings",
    "/proxy/openai/v1/embeddings/..",
    "/proxy/openai/v1%2fembeddings",
    "/proxy/openai/v1%2Fembeddings",
    "/proxy/openai/v1%5cembeddings",
    "/proxy/openai/v1/embeddings\\..\\chat",
    "/proxy/openai/v1/embeddings%00",
    "/proxy/openai/v1/%252e%252e/embeddings",
    "/proxy/openai/v1/embeddings%3Fkey=x",
    "/proxy/openai//evil.example/v1/embeddings",
    "/proxy/openai/v1/embeddings/..%2f..%2fv1%2fchat%2fcompletions",
    "/proxy/openai/v1/embeddings;/../chat/completions",
    "/proxy/../v1/leases",
    "/proxy/%2e%2e/v1/leases",
    "/proxy/google/v1beta/models/..%2f..%2fx:generateContent",
    "/proxy/google/v1beta/models/gemini@evil.example:generateContent",
    "/proxy/google/v1beta/models/a/b:generateContent",
    "/proxy/google/v1beta/models/..:generateContent",
    "/proxy/google/v1/models/gemini..x:generateContent",
    "http://evil.example/proxy/openai/v1/embeddings",
])
def test_traversal_never_reaches_another_route_or_host(gw: Broker, target: str) -> None:
    """Dot segments, encoded separators, `//` hosts and absolute forms are 404, no upstream."""
    reply = gw.http("POST", target, body=EMBED, headers=[("Content-Type", "application/json")])
    assert (reply.status, reply.code) == (404, "route_not_found"), reply.body
    assert gw.upstream_count() == 0


@pytest.mark.parametrize("target", ["/proxy//openai/v1//embeddings",
                                    "/proxy/openai/v1/%65mbeddings",
                                    "/proxy/openai/v1/embeddings/"])
def test_harmless_spellings_reach_only_their_own_route(gw: Broker, target: str) -> None:
    """Collapsible spellings of a route reach it, rebuilt: upstream sees the clean path."""
    reply = gw.http("POST", target, body=EMBED, headers=[("Content-Type", "application/json")])
    assert reply.status == 200, reply.body
    assert [r.path for r in gw.standins["openai"].requests] == ["/v1/embeddings"]


# --- smuggling and framing ----------------------------------------------------------------------


def _smuggling_cases(token: str) -> dict[str, bytes]:
    head = (f"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n").encode()
    inner = (b"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Length: 2\r\n\r\n{}")
    body = EMBED
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    return {
        "duplicate content-length": head + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(body), len(body) + len(inner)) + body + inner,
        "content-length then chunked": head + b"Content-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % (5 + len(inner)) + b"0\r\n\r\n" + inner,
        "chunked then content-length": head + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n" + chunked + inner,
        "chunked, identity": head + b"Transfer-Encoding: chunked, identity\r\n\r\n" + chunked,
        "xchunked": head + b"Transfer-Encoding: xchunked\r\n\r\n" + chunked + inner,
        "two transfer-encodings": head + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n" + chunked,
        "content-length +n": head + b"Content-Length: +%d\r\n\r\n" % len(body) + body,
        "content-length -1": head + b"Content-Length: -1\r\n\r\n" + body,
        "content-length list": head + b"Content-Length: %d, %d\r\n\r\n" % (len(body), len(body))
        + body,
        "space before colon": head + b"Content-Length : %d\r\n\r\n" % len(body) + body,
        "obs-fold": head + b"Content-Length: %d\r\nX-Fold: a\r\n b\r\n\r\n" % len(body) + body,
        "bare LF": head.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % len(body) + body,
        "NUL in a header": head + b"X-Broker-Consumer: default\x00evil\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
        "CR in a header": head + b"X-Broker-Secret-Ref: openai_api_key\rX: y\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
        "bad chunk extension": head + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x;\x00\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
        "chunk size overflow": head + b"Transfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n",
        "lower-case method": head.replace(b"POST", b"post") + b"Content-Length: %d\r\n\r\n"
        % len(body) + body,
        "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    }


@pytest.mark.parametrize("case", list(_smuggling_cases("x")))
def test_ambiguous_framing_is_refused_and_never_forwarded(gw: Broker, case: str) -> None:
    """Duplicate Content-Length, CL+TE and other framing tricks: 400, one reply, no upstream."""
    received = gw.raw(_smuggling_cases(gw.token)[case])
    reply = parse(received)
    assert reply.status == 400
    assert received.endswith(reply.body)  # exactly one reply: nothing smuggled got an answer
    assert gw.upstream_count() == 0
    assert gw.token not in gw.log()  # the parser's error quotes the raw line; never logged
    assert_no_handler_crashed(gw)
    assert_still_serves(gw)


def test_pipelined_request_after_a_chunked_body_is_judged_on_its_own(gw: Broker) -> None:
    """A second request hidden after a well-framed body gets its own auth check (401)."""
    head = (f"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {gw.token}\r\n").encode()
    inner = (b"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(EMBED) + EMBED)
    received = gw.raw(head + b"Transfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n" % len(EMBED) + EMBED + b"\r\n0\r\n\r\n" + inner)
    first = parse(received)
    second = parse(received[received.index(first.body) + len(first.body):])
    assert (first.status, second.status, second.code) == (200, 401, "unauthorized")
    assert len(gw.standins["openai"].requests) == 1


# --- sizes and slow clients -----------------------------------------------------------------------


def test_oversized_headers_and_bodies_are_refused(gw: Broker) -> None:
    """Huge header lines or counts are 400; bodies past max_body_bytes are 413; no upstream."""
    big = "a" * 9000
    assert gw.http("GET", "/v1/health", headers=[("X-Big", big)]).status == 400
    assert gw.http("GET", f"/v1/health?{big}").status == 400
    many = [(f"X-H{i}", "v") for i in range(200)]
    assert gw.http("GET", "/v1/health", headers=many).status == 400
    assert gw.http("GET", "/v1/health", token="sbt_" + big).status == 400
    too_big = b'{"input": "' + b"a" * 70_000 + b'"}'
    declared = gw.post("openai", "v1/embeddings", too_big)
    assert (declared.status, declared.code) == (413, "body_too_large")
    lease = gw.http("POST", "/v1/leases", body=too_big)
    assert (lease.status, lease.code) == (413, "body_too_large")
    chunks = b"".join(b"4000\r\n" + b"a" * 0x4000 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"
    chunked = parse(gw.raw(
        f"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        f"{gw.token}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        + chunks))
    assert (chunked.status, chunked.code) == (413, "body_too_large")
    assert gw.upstream_count() == 0
    assert gw.token not in gw.log()
    assert_no_handler_crashed(gw)
    assert_still_serves(gw)


def test_hundred_half_open_connections_do_not_starve_a_real_request(gw: Broker) -> None:
    """100 slow clients (stalled headers or bodies) hold sockets; a real SDK call still works."""
    stalled: list[socket.socket] = []
    try:
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            stalled.append(sock)
            if i % 2:  # headers never finished
                sock.sendall(b"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Authorization: Bearer " + gw.token.encode()[: i % 20])
            else:  # authenticated, body promised but never sent
                sock.sendall(b"POST /proxy/openai/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Authorization: Bearer " + gw.token.encode() + b"\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"inp")
        client = openai_client(f"{gw.daemon.url}/proxy/openai", gw.token)
        answer = client.embeddings.create(model="m", input="a")
        assert answer.data[0].embedding == [0.0, 0.25, 0.5, 0.75]
        assert len(gw.standins["openai"].requests) == 1  # the stalled ones never went out
    finally:
        for sock in stalled:
            sock.close()
    assert gw.http("GET", "/v1/health").status == 200


# --- the lease API's JSON -----------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b"null", b'"text"', b"1" * 5000, b"[" * 50_000, b"{\"a\":" * 10_000,
    b'{"secret_ref": "\xff\xfe", "purpose": "llm.chat", "delivery": "native"}',
    b'{"secret_ref": NaN, "purpose": "llm.chat", "delivery": "native"}',
    b'{"secret_ref": ["openai_api_key"], "purpose": "llm.chat", "delivery": "native"}',
    b'{"secret_ref": "../vault.key", "purpose": "llm.chat", "delivery": "native"}',
    b'{"secret_ref": "!instance-key", "purpose": "llm.chat", "delivery": "native"}',
    b'{"secret_ref": "openai_api_key", "purpose": "llm.chat", "delivery": "native", "x": 1}',
    b'{"secret_ref": "openai_api_key", "purpose": "llm.chat", "delivery": "carrier-pigeon"}',
])
def test_malformed_lease_requests_are_400_never_500(gw: Broker, body: bytes) -> None:
    """Broken, deep, huge-number or wrong-typed JSON on the lease API is 400 invalid_request."""
    reply = gw.http("POST", "/v1/leases", body=body,
                    headers=[("Content-Type", "application/json")])
    assert (reply.status, reply.code) == (400, "invalid_request"), reply.raw[:300]
    assert "value" not in reply.json()
    assert_no_handler_crashed(gw)


# --- credentials --------------------------------------------------------------------------------


def test_caller_credentials_never_reach_upstream(gw: Broker) -> None:
    """Caller credentials, in any header or `?key=` spelling, never reach upstream; the key once."""
    tok = gw.token
    for query in (f"key={tok}", f"KEY={tok}", f"%6Bey={tok}", f"k%65y={tok}",
                  f"alt=sse;key={tok}", f"key={tok}&key={tok}&alt=sse", f"key+={tok}",
                  f"x=1&Key={tok}", f"api_key={tok}&alt=sse", f"t=Bearer%20{tok[:3]}%5F{tok[4:]}"):
        reply = gw.post("google", f"{GEMINI_PATH}?{query}", GEMINI, token=None,
                        headers=[("x-goog-api-key", tok)])
        assert reply.status == 200, (query, reply.body)
    sneaky = [[("x-goog-api-key", tok)], [("Proxy-Authorization", f"Bearer {tok}")],
              [("api-key", tok)], [("x-api-key", tok)], [("Cookie", f"t={tok}")],
              [("Authorization", f"Basic {tok}")], [("Authorization", f"Bearer {tok}")],
              [("Connection", "authorization, x-sneak"), ("X-Sneak", tok)],
              [("X-Broker-Token", tok)], [("OpenAI-Organization", tok)],
              [("X-My-Gateway-Key", tok)], [("X-Trace", f"caller={tok};span=1")]]
    for headers in sneaky:
        assert gw.post("openai", "v1/embeddings", headers=headers).status == 200, headers
    recorded = gw.standins["google"].requests + gw.standins["openai"].requests
    assert len(recorded) == 10 + len(sneaky)
    for rec in recorded:
        sent = json.dumps(rec.headers) + unquote_plus(rec.query) + rec.body.decode()
        assert tok not in sent
    for rec in gw.standins["google"].requests:
        assert rec.headers["x-goog-api-key"] == real_key("google")
        assert "key" not in rec.query.lower()
        assert "authorization" not in rec.headers
    for rec in gw.standins["openai"].requests:
        assert rec.headers["authorization"] == f"Bearer {real_key('openai')}"  # exactly once


def test_secret_ref_header_cannot_send_a_key_to_another_host(gw: Broker) -> None:
    """X-Broker-Secret-Ref cannot send a key to a host its grant does not list; bad refs are 400."""
    reply = gw.post("openai", "v1/embeddings", headers=[("X-Broker-Secret-Ref", "jina_api_key")])
    assert (reply.status, reply.code) == (403, "grant_denied")
    for ref in ("../vault.key", "!instance-key", "@", "a/b", "x" * 129):
        bad = gw.post("openai", "v1/embeddings", headers=[("X-Broker-Secret-Ref", ref)])
        assert (bad.status, bad.code) == (400, "invalid_request"), ref
    doubled = gw.post("openai", "v1/embeddings", headers=[("X-Broker-Secret-Ref", "openai_api_key"),
                                                          ("X-Broker-Secret-Ref", "jina_api_key")])
    assert (doubled.status, doubled.code) == (400, "invalid_request")
    assert gw.upstream_count() == 0
    assert gw.events("lease.denied")[-1]["secret_ref"] == "jina_api_key"
