"""The egress gateway with the providers' real SDKs, through a real daemon, to stand-ins.

Each provider's stand-in checks the key it receives; every test asserts that upstream saw
the real key and never the broker token.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import openai
import pytest
import voyageai.error
from google.genai import errors as genai_errors

from tests.conftest import Cli, scan, start_daemon, wait_for
from tests.support.gateway import JINA_BODY, PROVIDERS, Broker, configure, real_key
from tests.support.sdk_clients import genai_client, jina_post, openai_client, voyage_client
from tests.support.standins import StandIn

# --- OpenAI -----------------------------------------------------------------------------------


def test_openai_sync_chat_responses_embeddings(gateway: Broker) -> None:
    """Chat, Responses and embeddings work through the broker with the broker token as key."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    stand = gateway.standins["openai"]
    chat = client.chat.completions.create(model="gpt-4o-mini",
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == stand.expected_text
    response = client.responses.create(model="gpt-4o-mini", input="hi")
    assert response.output_text == stand.expected_text
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [e.embedding for e in emb.data] == [StandIn.embedding(0), StandIn.embedding(1)]
    assert [r.path for r in stand.requests] == ["/v1/chat/completions", "/v1/responses",
                                                "/v1/embeddings"]
    gateway.assert_only_real_key_upstream("openai")
    events = gateway.audit("proxy.request")
    assert [e["status"] for e in events] == [200, 200, 200]
    assert events[0]["input_tokens"] == stand.input_tokens


def test_openai_streaming_chat_and_responses_helper(gateway: Broker) -> None:
    """Chat streaming and the `responses.stream()` helper arrive whole, chunk by chunk."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    stand = gateway.standins["openai"]
    stream = client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == stand.expected_text
    with client.responses.stream(model="m", input="hi") as events:
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        final = events.get_final_response()
    assert "".join(deltas) == stand.expected_text == final.output_text
    gateway.assert_only_real_key_upstream("openai")


async def test_openai_async_chat_stream_and_embeddings(gateway: Broker) -> None:
    """The async client streams and embeds through the broker too."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token, async_=True)
    stand = gateway.standins["openai"]
    stream = await client.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "hi"}])
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == stand.expected_text
    emb = await client.embeddings.create(model="m", input="a")
    assert emb.data[0].embedding == StandIn.embedding(0)
    async with client.responses.stream(model="m", input="hi") as events:
        final = await events.get_final_response()
    assert final.output_text == stand.expected_text
    await client.close()
    gateway.assert_only_real_key_upstream("openai")


def test_openai_denied_raises_permission_error_without_upstream(gateway: Broker) -> None:
    """An ungranted consumer gets the SDK's PermissionDeniedError; upstream sees nothing."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token,
                           default_headers={"X-Broker-Consumer": "stranger"})
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "grant_denied"
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert gateway.standins["openai"].requests == []


def test_wrong_broker_token_is_authentication_error(gateway: Broker) -> None:
    """A wrong broker token is the SDK's AuthenticationError, never forwarded."""
    client = openai_client(gateway.root("openai"), "sbt_not-the-token")
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="m", input="a")
    assert gateway.standins["openai"].requests == []


# --- Google -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_google_generate_and_stream_sync(gateway: Broker, version: str) -> None:
    """google-genai generate and stream, on v1 and v1beta, with the key as x-goog-api-key."""
    client = genai_client(gateway.root("google"), gateway.daemon.token, api_version=version)
    stand = gateway.standins["google"]
    answer = client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert answer.text == stand.expected_text
    chunks = list(client.models.generate_content_stream(model="gemini-2.0-flash", contents="hi"))
    assert "".join(c.text or "" for c in chunks) == stand.expected_text
    assert stand.requests[-1].query == "alt=sse"
    assert stand.requests[-1].path == f"/{version}/models/gemini-2.0-flash:streamGenerateContent"
    gateway.assert_only_real_key_upstream("google")
    assert gateway.audit("proxy.request")[-1]["model"] == "gemini-2.0-flash"


@pytest.mark.parametrize("version", ["v1", "v1beta"])
async def test_google_generate_and_stream_async(gateway: Broker, version: str) -> None:
    """The async google-genai client (aiohttp underneath) works through the broker."""
    client = genai_client(gateway.root("google"), gateway.daemon.token, api_version=version)
    stand = gateway.standins["google"]
    answer = await client.aio.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert answer.text == stand.expected_text
    stream = await client.aio.models.generate_content_stream(model="gemini-2.0-flash",
                                                             contents="hi")
    assert "".join([c.text or "" async for c in stream]) == stand.expected_text
    gateway.assert_only_real_key_upstream("google")


def test_google_denied_is_client_error_403(gateway: Broker) -> None:
    """A denial reaches google-genai as its own ClientError with a 403 in Google's shape."""
    client = genai_client(gateway.root("google"), gateway.daemon.token,
                          headers={"X-Broker-Consumer": "stranger"})
    with pytest.raises(genai_errors.ClientError) as exc:
        client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert exc.value.code == 403 and exc.value.status == "PERMISSION_DENIED"
    assert gateway.standins["google"].requests == []


# --- Voyage and Jina --------------------------------------------------------------------------


def test_voyage_embed_and_rerank(gateway: Broker) -> None:
    """voyageai embed and rerank go through with the real key."""
    client = voyage_client(gateway.root("voyage"), gateway.daemon.token)
    emb = client.embed(["a", "b"], model="voyage-3")
    assert emb.embeddings == [StandIn.embedding(0), StandIn.embedding(1)]
    ranked = client.rerank("q", ["d0", "d1"], model="rerank-2")
    assert ranked.results[0].index == 1
    gateway.assert_only_real_key_upstream("voyage")


async def test_voyage_async_and_denied(gateway: Broker) -> None:
    """The async voyage client works; a denied rerank raises voyageai's own error."""
    client = voyage_client(gateway.root("voyage"), gateway.daemon.token, async_=True)
    emb = await client.embed(["a"], model="voyage-3")
    assert emb.embeddings == [StandIn.embedding(0)]
    gateway.cli.ok("remove", "@voyage_api_key")
    with pytest.raises(voyageai.error.VoyageError):
        await client.rerank("q", ["d"], model="rerank-2")


def test_jina_embeddings_and_rerank_over_http(gateway: Broker) -> None:
    """Jina's HTTP API, called with the broker token, answers with the real key upstream."""
    status, _, body = jina_post(gateway.root("jina"), gateway.daemon.token, "v1/embeddings",
                                {"model": "jina-embeddings-v3", "input": ["a"]})
    assert status == 200 and json.loads(body)["data"][0]["embedding"] == StandIn.embedding(0)
    status, _, body = jina_post(gateway.root("jina"), gateway.daemon.token, "v1/rerank",
                                {"model": "jina-reranker-v2", "query": "q",
                                 "documents": ["a", "b"]})
    assert status == 200 and json.loads(body)["results"]
    gateway.assert_only_real_key_upstream("jina")


def test_jina_denied_is_detail_shaped(gateway: Broker) -> None:
    """Jina and Voyage errors use {"detail": …}."""
    status, headers, body = jina_post(gateway.root("jina"), gateway.daemon.token, "v1/embeddings",
                                      JINA_BODY, headers={"X-Broker-Consumer": "nobody"})
    assert status == 403 and "detail" in json.loads(body)
    assert headers["x-should-retry"] == "false"


# --- streaming behaviour ------------------------------------------------------------------------


def test_first_chunk_arrives_before_the_last_is_sent(gateway: Broker) -> None:
    """Unbuffered: with pauses upstream, the caller holds chunk 1 before chunk N exists."""
    stand = gateway.standins["openai"]
    stand.chunk_delay, stand.n_chunks = 0.2, 6
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    stream = client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    arrivals = [time.monotonic() for c in stream if c.choices and c.choices[0].delta.content]
    assert len(arrivals) == 6
    assert arrivals[0] < stand.sent_at[-1]  # an ordering fact, not a timing threshold


def test_client_disconnect_cancels_upstream(gateway: Broker) -> None:
    """A caller that goes away mid-stream makes the broker drop the upstream request."""
    stand = gateway.standins["openai"]
    stand.chunk_delay, stand.n_chunks = 0.3, 50
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    stream = client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    next(iter(stream))
    stream.close()
    assert stand.disconnected.wait(10), "upstream never saw the disconnect"
    wait_for(lambda: any(e.get("outcome") == "client_disconnected"
                         for e in gateway.audit("proxy.request")), what="the audit event")


def test_upstream_reset_mid_stream_reaches_the_caller(gateway: Broker) -> None:
    """An upstream that dies mid-stream cuts the caller's connection (no silent truncation)."""
    stand = gateway.standins["openai"]
    stand.n_chunks, stand.reset_after = 10, 2
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    with pytest.raises(openai.APIConnectionError):
        stream = client.chat.completions.create(model="m", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        for _ in stream:
            pass
    wait_for(lambda: any(e.get("outcome") == "upstream_reset"
                         for e in gateway.audit("proxy.request")), what="the audit event")


def test_gzip_passes_through_byte_for_byte(gateway: Broker) -> None:
    """Content-Encoding and the compressed bytes reach the caller untouched."""
    stand = gateway.standins["jina"]
    stand.gzip = True
    status, headers, body = jina_post(gateway.root("jina"), gateway.daemon.token,
                                      "v1/embeddings", JINA_BODY,
                                      headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert body == stand.last_gzip_body


def test_sigterm_lets_an_inflight_stream_finish(gateway: Broker) -> None:
    """SIGTERM during a streamed request: the stream completes, then the broker exits 0."""
    stand = gateway.standins["openai"]
    stand.chunk_delay, stand.n_chunks = 0.2, 8
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    stream = client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    it = iter(stream)
    pieces = [next(it).choices[0].delta.content or ""]
    gateway.daemon.proc.send_signal(signal.SIGTERM)
    pieces += [c.choices[0].delta.content or "" for c in it if c.choices]
    assert "".join(pieces) == stand.expected_text
    assert gateway.daemon.proc.wait(30) == 0


# --- path safety, credentials, upstream faults ----------------------------------------------------


@pytest.mark.parametrize("path", [
    "/proxy/openai/v1/../v1/chat/completions",
    "/proxy/openai/v1/%2e%2e/v1/chat/completions",
    "/proxy/openai/v1%2fchat%2fcompletions",
    "/proxy/openai/v1/chat/completions%2F..%2F..%2Fadmin",
    "/proxy/openai/v1/models",
    "/proxy/nope/v1/chat/completions",
    "/proxy/openai/v1/chat\\completions",
])
def test_traversal_and_unknown_paths_are_404_before_upstream(gateway: Broker, path: str) -> None:
    """Paths that normalise outside the route table are 404 with no upstream I/O."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.daemon.port, timeout=10)
    conn.request("POST", path, body=b"{}", headers={"Authorization":
                                                    f"Bearer {gateway.daemon.token}"})
    resp = conn.getresponse()
    assert resp.status == 404 and json.loads(resp.read())["error"]["code"] == "route_not_found"
    assert all(s.requests == [] for s in gateway.standins.values())


def test_doubled_slashes_collapse_to_the_route(gateway: Broker) -> None:
    """`//` is collapsed, so the request still reaches the one route it names."""
    status, _, _ = jina_post(gateway.daemon.url + "/proxy//jina/", gateway.daemon.token,
                             "/v1//embeddings", JINA_BODY)
    assert status == 200
    assert gateway.standins["jina"].last.path == "/v1/embeddings"


def test_get_on_a_post_route_is_405(gateway: Broker) -> None:
    """Methods other than the route's are 405."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(gateway.root("openai") + "/v1/embeddings",  # noqa: S310
                                 headers={"Authorization": f"Bearer {gateway.daemon.token}"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310
    assert exc.value.code == 405


def test_caller_credentials_never_reach_upstream(gateway: Broker) -> None:
    """`?key=`, x-goog-api-key, X-Broker-*, Connection-named and org headers are stripped."""
    client = genai_client(gateway.root("google"), gateway.daemon.token,
                          headers={"X-Broker-Extra": "x", "OpenAI-Organization": "org-evil",
                                   "Connection": "keep-alive, X-Smuggle", "X-Smuggle": "yes"})
    client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    rec = gateway.standins["google"].last
    assert rec.headers["x-goog-api-key"] == real_key("google")
    assert not {"x-broker-extra", "openai-organization", "x-smuggle", "authorization"} \
        & set(rec.headers)
    status, _, _ = jina_post(gateway.root("jina"), gateway.daemon.token,
                             "v1/embeddings?key=stolen&keep=1", JINA_BODY,
                             headers={"Authorization": f"Bearer {gateway.daemon.token}"})
    assert status == 200
    assert gateway.standins["jina"].last.query == "keep=1"


def test_redirects_are_never_followed(cli: Cli, standins: dict[str, StandIn]) -> None:
    """An upstream 302 becomes a 502 for the caller; the redirect target is never hit."""
    cli.add("@openai_api_key", real_key("openai"))
    stand = standins["openai"]
    configure(cli, {"openai": stand}, base_urls={"openai": stand.base_url + "/_redirect"})
    d = start_daemon(cli.home, cli.env)
    try:
        client = openai_client(f"{d.url}/proxy/openai", d.token)
        with pytest.raises(openai.APIStatusError) as exc:
            client.embeddings.create(model="m", input="a")
        assert exc.value.status_code == 502
        assert exc.value.code == "upstream_redirect"
        assert not stand.redirected_hit
    finally:
        d.stop()


def test_upstream_5xx_and_hang(cli: Cli, standins: dict[str, StandIn]) -> None:
    """A 503 upstream passes through as is; a hang hits the idle timeout as 504."""
    cli.add("@openai_api_key", real_key("openai"))
    cli.add("@jina_api_key", real_key("jina"), provider="jina")
    configure(cli, {"openai": standins["openai"], "jina": standins["jina"]},
              extra="[limits]\nread_timeout_secs = 1\n",
              base_urls={"openai": standins["openai"].base_url + "/_status/503",
                         "jina": standins["jina"].base_url + "/_hang"})
    d = start_daemon(cli.home, cli.env)
    try:
        client = openai_client(f"{d.url}/proxy/openai", d.token)
        with pytest.raises(openai.InternalServerError) as exc:
            client.embeddings.create(model="m", input="a")
        assert exc.value.status_code == 503
        status, _, body = jina_post(f"{d.url}/proxy/jina", d.token, "v1/embeddings",
                                    JINA_BODY)
        assert status == 504 and json.loads(body)["code"] == "upstream_timeout"
    finally:
        d.stop()


async def test_concurrent_first_requests_mint_one_lease(gateway: Broker) -> None:
    """20 concurrent first requests for one (consumer, secret, purpose, host) share a lease."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token, async_=True)
    results = await asyncio.gather(*[client.embeddings.create(model="m", input="a")
                                     for _ in range(20)])
    assert len(results) == 20
    await client.close()
    issued = gateway.audit("lease.issued")
    assert len(issued) == 1
    assert {e["lease_id"] for e in gateway.audit("proxy.request")} == {issued[0]["lease_id"]}


def test_no_key_or_token_in_logs_or_audit(gateway: Broker) -> None:
    """After a session of proxied calls, neither log nor audit holds a key or the token."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    gateway.daemon.stop()
    texts = [gateway.daemon.log(), (gateway.cli.home / "audit.log").read_text(),
             *gateway.cli.outputs]
    assert scan(texts, *(real_key(p) for p in PROVIDERS), gateway.daemon.token) == []


def test_every_use_updates_last_used(gateway: Broker) -> None:
    """last_used_at moves with each proxied use, not only the first (cached) read."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)

    def last_used() -> str | None:
        meta = json.loads(gateway.cli.ok("inspect", "@openai_api_key", "--json"))
        return meta["last_used_at"]

    client.embeddings.create(model="m", input="a")
    first = wait_for(last_used, what="a first last-used time")
    client.embeddings.create(model="m", input="a")
    wait_for(lambda: (last_used() or "") > first, what="a later last-used time")
