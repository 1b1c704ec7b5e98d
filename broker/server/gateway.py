"""The egress gateway handler: match, lease, swap the key, stream the answer through.

Request headers are stripped first (caller credentials, X-Broker-*, hop-by-hop, anything
`Connection` names) and the real key is set last, so nothing a caller sends can remove or
shadow it (tokenizer's StripHazmat, then ApplyDst). The response is written chunk by
chunk as it arrives, undecoded; redirects are never followed while a key is attached.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import quote, unquote_plus

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from broker.core.clock import utc_day
from broker.core.errors import (
    BrokerError,
    SecretNotFound,
    SecretUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
    UsageError,
)
from broker.core.protocol import MAX_ANSWER_BYTES, SCRUB_HEADER
from broker.core.refs import parse_ref
from broker.gateway import routes
from broker.gateway.providers import Provider
from broker.gateway.scrub import scrub_bytes
from broker.gateway.usage import (
    Reservation,
    Usage,
    UsageTap,
    estimate_tokens,
    request_doc,
    request_model,
)
from broker.server.inputs import consumer_of, read_body
from broker.server.state import ACCESS, AUDIT, CONFIG, SECRETS, SPENDING, SecretsCache

log = structlog.get_logger("broker.server.gateway")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Caller credentials in every form a provider SDK sends them, and org/project selectors
# that must come from the owner's key, not the caller.
CALLER_CREDENTIALS = frozenset({
    "authorization", "x-goog-api-key", "api-key", "x-api-key", "openai-organization",
    "openai-project", "cookie",
})
REQUEST_DROP = HOP_BY_HOP | CALLER_CREDENTIALS | {"host", "content-length", "origin", "referer"}
# What no HTTP header value may hold (RFC 9110 5.5: controls other than tab); aiohttp
# refuses to send it, so a stored value holding one is reported, never handed on.
UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "server", "date", "alt-svc"}
Exchange = dict[str, Any]  # what the audit records of one proxied request
# The pooled session every upstream call goes through; opened at startup, closed at cleanup.
UPSTREAM: web.AppKey[aiohttp.ClientSession] = web.AppKey("upstream", aiohttp.ClientSession)


async def open_upstream(app: web.Application) -> None:
    cfg = app[CONFIG].config
    app[UPSTREAM] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_secs,
                                      sock_connect=cfg.connect_timeout_secs,
                                      sock_read=cfg.read_timeout_secs),
        auto_decompress=False,  # bytes pass through exactly as the provider sent them
        trust_env=False,  # never route a key through a proxy named in the environment
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept-Encoding", "User-Agent"),  # send only what the caller sent
    )


async def close_upstream(app: web.Application) -> None:
    await app[UPSTREAM].close()


def upstream_headers(incoming: Any, provider: Provider, key: str,
                     withheld: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """The caller's headers as the upstream gets them: credentials, hop-by-hop and broker
    headers gone, any header holding a `withheld` string (a broker token) gone, the key in."""
    named_by_connection = {
        token.strip().lower()
        for value in incoming.getall("Connection", [])
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if (lowered in REQUEST_DROP or lowered in named_by_connection
                or lowered.startswith("x-broker-") or any(t in value for t in withheld)):
            continue
        out.add(name, value)
    for name, value in provider.add_headers:  # e.g. anthropic-version, unless the caller set it
        if name not in out:
            out[name] = value
    out[provider.auth_header] = provider.auth_format.replace("{key}", key)
    return out


def strip_key_param(query: str, withheld: tuple[str, ...] = ()) -> str:
    """Drop `key=` (Google's query-string credential), and any parameter holding a
    `withheld` string (a broker token); keep everything else as sent.

    Servers differ on whether `;` separates parameters, so both `&` and `;` do here, and
    a parameter is read as a server might read it (decoded, trimmed, any case)."""
    if not query:
        return query
    pieces = re.split(r"([&;])", query)  # part, separator, part, ...
    out: list[str] = []
    for i in range(0, len(pieces), 2):
        decoded = unquote_plus(pieces[i])
        if (unquote_plus(pieces[i].split("=", 1)[0]).strip().lower() == "key"
                or any(t in decoded for t in withheld)):
            continue
        if out:
            out.append(pieces[i - 1])
        out.append(pieces[i])
    return "".join(out)


def _secret_ref(request: web.Request, cache: SecretsCache, provider: Provider) -> str:
    if len(request.headers.getall("X-Broker-Secret-Ref", [])) > 1:  # which one would win?
        raise UsageError("send X-Broker-Secret-Ref once")
    named = request.headers.get("X-Broker-Secret-Ref")
    return parse_ref(named) if named is not None else cache.secret_for(provider)


async def handle(request: web.Request) -> web.StreamResponse:
    config, cache, spending = request.app[CONFIG], request.app[SECRETS], request.app[SPENDING]
    audit = request.app[AUDIT]
    m = routes.match(config.providers, request.method, request.raw_path)
    provider = m.provider
    request["route"] = f"/proxy/{provider.name}/{m.route.path}"
    consumer = request["consumer"] = consumer_of(request)
    audit.check_audit()
    started = time.perf_counter()
    ex: Exchange = {"status": None, "bytes_out": 0, "outcome": "ok", "secret_ref": None,
                    "lease_id": None, "model": m.params.get("model")}
    tap: UsageTap | None = None
    reservation: Reservation | None = None
    try:
        body = await read_body(request, config.config.max_body_bytes,
                               "[limits] max_body_bytes in config.toml")
        doc = _json(request, body)
        ex["model"] = request_model(m.params, doc)
        ref = ex["secret_ref"] = _secret_ref(request, cache, provider)
        try:
            version = cache.secret_version(ref)
        except SecretNotFound as exc:
            raise SecretUnavailable(exc.message) from None
        lease = request.app[ACCESS].acquire(
            (consumer, ref, m.route.purpose, "http_header_inject", provider.host),
            version, provider=provider.name, route=m.route.path)
        request["lease_id"] = ex["lease_id"] = lease.lease_id
        key = cache.value(ref, version)
        if UNSENDABLE.search(key):
            raise SecretUnavailable(f"the value of @{ref} holds a control character (a line "
                                    "break, NUL, ...) and cannot be sent in a header; replace it "
                                    f"with `secret-broker rotate @{ref}`")
        if provider.base_url is None:
            raise SecretUnavailable(f"provider {provider.name} has no base_url: set one in "
                                    f"config.toml [providers.{provider.name}]")
        withheld = request["broker_tokens"]
        query = with_route_query(strip_key_param(m.query, withheld), m.route.query)
        url = URL(m.upstream_url(query), encoded=True)
        fmt = m.usage_format
        estimate = estimate_tokens(body, doc)
        reservation = spending.reserve_budget(request["principal"], estimate)
        headers = upstream_headers(request.headers, provider, key, withheld)
        scrub = _scrub_request(request, headers, cache)
        response, tap = await _forward(request, request.app[UPSTREAM], url, headers, body, ex,
                                       None if fmt == "none" else fmt, scrub)
        if tap is not None:
            tap.finish()
        return response
    except asyncio.CancelledError:
        ex["outcome"] = "client_disconnected"
        raise
    except BrokerError as exc:
        ex["status"], ex["outcome"] = exc.status, exc.code
        raise
    finally:
        usage = tap.usage if tap is not None else Usage()
        failed = ex["outcome"] != "ok" or (ex["status"] or 0) >= 400
        if reservation is not None:  # unknown usage from a reached upstream costs the estimate
            spending.budgets.settle(reservation, usage.total if usage.known
                                 else (reservation.estimate if ex["status"] else 0))
        spending.usage.record(consumer, provider.name, ex["model"], m.route.path, utc_day(), usage,
                           failed)
        audit.record_later(
            "proxy.request", consumer=consumer, purpose=m.route.purpose, provider=provider.name,
            route=m.route.path, duration_ms=round((time.perf_counter() - started) * 1000, 2),
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, **ex)


def _json(request: web.Request, body: bytes) -> Any:
    """The request's JSON body, for its model and token limits (None if it has none)."""
    if "json" not in request.headers.get("Content-Type", "") or not body:
        return None
    return request_doc(body)


def with_route_query(query: str, fixed: tuple[tuple[str, str], ...]) -> str:
    """Add a route's fixed query parameters (Azure's api-version) only where absent."""
    present = {unquote_plus(p.split("=", 1)[0]) for p in query.split("&") if p}
    extra = [f"{quote(k)}={quote(v)}" for k, v in fixed if k not in present]
    return "&".join(([query] if query else []) + extra)


def _scrub_request(request: web.Request, headers: CIMultiDict[str],
                   cache: SecretsCache) -> list[str] | None:
    """The stored values to scrub from the answer, where the caller (the MCP server) asks
    for it; the upstream is then asked for an unencoded answer, which can be scrubbed."""
    asked = request.headers.getall(SCRUB_HEADER, [])
    if not asked:
        return None
    if asked != ["values"]:
        raise UsageError(f"send {SCRUB_HEADER}: values, once")
    headers["Accept-Encoding"] = "identity"
    return cache.stored_values()


async def _scrubbed(request: web.Request, upstream: aiohttp.ClientResponse,
                    response: web.StreamResponse, values: list[str], ex: Exchange,
                    tap: UsageTap | None) -> web.StreamResponse:
    """The whole answer (at most MAX_ANSWER_BYTES + 1, as the MCP server reads it) with
    every stored value replaced, in one write."""
    if upstream.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UpstreamUnreachable("the upstream sent an encoded answer, which cannot be "
                                  "scrubbed of stored values", code="upstream_encoded")
    raw = b""
    async for chunk in upstream.content.iter_any():
        raw += chunk
        ex["bytes_out"] += len(chunk)
        if tap is not None:
            tap.feed(chunk)
        if len(raw) > MAX_ANSWER_BYTES:
            break
    cut = len(raw) > MAX_ANSWER_BYTES
    response.headers.popall("Content-Length", None)
    await response.prepare(request)
    await response.write(scrub_bytes(raw[:MAX_ANSWER_BYTES + 1], values, cut))
    await response.write_eof()
    return response


async def _forward(request: web.Request, session: aiohttp.ClientSession, url: URL,
                   headers: CIMultiDict[str], body: bytes, ex: Exchange, usage_format: str | None,
                   scrub: list[str] | None = None) -> tuple[web.StreamResponse, UsageTap | None]:
    try:
        upstream = await session.request(request.method, url, headers=headers, data=body,
                                                allow_redirects=False)
    except (TimeoutError, aiohttp.ServerTimeoutError):  # a timeout is also a connection error
        raise UpstreamTimeout(f"the upstream {url.host} did not answer in time") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(f"cannot reach the upstream {url.host} "
                                  f"({type(exc).__name__})") from None
    async with upstream:
        if 300 <= upstream.status < 400:
            raise UpstreamUnreachable(
                f"the upstream answered {upstream.status} (a redirect); the broker never "
                "follows one with a key attached", code="upstream_redirect")
        ex["status"] = upstream.status
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in RESPONSE_DROP:
                response.headers.add(name, value)
        if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            # As aiohttp's own Response does: headers go out with the first body bytes, one
            # write and one wake-up less per request. Event streams keep the headers-first
            # write, so a caller sees the response begin at once.
            response._send_headers_immediately = False
        tap = None if usage_format is None else UsageTap(
            usage_format, upstream.headers.get("Content-Type", ""),
            upstream.headers.get("Content-Encoding"))
        try:
            if scrub is not None:
                return await _scrubbed(request, upstream, response, scrub, ex, tap), tap
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                ex["bytes_out"] += len(chunk)
                if tap is not None:
                    tap.feed(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is a cut connection.
            ex["outcome"] = "upstream_timeout" if isinstance(exc, TimeoutError) \
                else "upstream_reset"
            if request.transport is not None:
                request.transport.close()
            return response, tap
        await response.write_eof()
    return response, tap
