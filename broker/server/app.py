"""The broker daemon: app wiring, middlewares, the /v1 routes, sockets and signals.

One aiohttp application is served on two transports: the Unix socket (no token; its
0600 mode in a 0700 directory is the protection) and loopback TCP (a bearer token).
Middlewares, outermost first: errors + request log, Host/Origin guard, authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import ipaddress
import json
import os
import signal
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from broker import __version__
from broker.config import Config, Home, check_private, load_config, open_private, private_dir
from broker.core import logs, netowner
from broker.core.errors import (
    AuditUnavailable,
    BodyTooLarge,
    BrokerError,
    BudgetExceeded,
    Forbidden,
    InsecureFile,
    NotFound,
    RouteNotFound,
    SecretNotFound,
    SecretUnavailable,
    Unauthorized,
    UnlockFailed,
    UsageError,
)
from broker.gateway import routes
from broker.gateway.providers import Provider, build_providers, error_body
from broker.gateway.usage import Budgets, Reservation, UsageBook, utc_day
from broker.server import hardening, ui
from broker.server.access import Access
from broker.server.auth import (
    Authenticator,
    ConsumerToken,
    FailureThrottle,
    Principal,
    RefusalTally,
    presented_token,
)
from broker.service.secrets import CONSUMER_RE, Service
from broker.store.audit import parse_rfc3339, rfc3339
from broker.store.backend import parse_ref
from broker.store.metadata import Metadata
from grants import DELIVERIES, AccessRequest, Lease
from grants.render import explain_as_json, grants_as_rows

log = structlog.get_logger("broker")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
STATE: web.AppKey[BrokerState] = web.AppKey("state", object)  # type: ignore[arg-type]


class BrokerState:
    """Everything the handlers share; built once at start."""

    def __init__(self, service: Service, config: Config) -> None:
        self.service = service
        self.config = config
        self.providers: dict[str, Provider] = build_providers(config.providers)
        self.auth = Authenticator(service.home.token)
        self.throttle = FailureThrottle()
        self.refusals = RefusalTally()
        self.access = Access(service.home.grants, self.record)
        self.admin = service.as_actor("admin")
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.listen = ""
        self._data_version = -1
        self._generation = -1
        self._secrets: dict[str, tuple[int, str]] = {}  # ref -> (version, provider)
        self._values: dict[str, tuple[int, str]] = {}  # ref -> (version, value), in memory only
        self._used: set[str] = set()
        self._ended_tokens: set[str] = set()
        self.tokens_used: set[str] = set()
        self.usage = UsageBook()
        self.budgets = Budgets()
        self.budgets.used = service.metadata.token_spend(utc_day())
        self.audit_broken = False
        self.upstream: Any = None  # the pooled aiohttp ClientSession, made in proxy.start()

    def record(self, event: str, **fields: Any) -> None:
        """Append to the audit log; a failure marks it broken so requests are refused."""
        try:
            self.service.record(event, **fields)
        except AuditUnavailable:
            self.audit_broken = True
            raise
        self.audit_broken = False

    def record_safely(self, event: str, **fields: Any) -> None:
        """For events after the fact (a finished request): log a failure, do not raise."""
        try:
            self.record(event, **fields)
        except AuditUnavailable as exc:
            log.error("audit.failed", audit_event=event, error=exc.message)

    async def refuse(self, request: web.Request, event: str, reason: str, status: int,
                     **fields: Any) -> None:
        """An unauthenticated refusal (foreign Host or Origin, bad or missing token, bad login
        code): audited and logged once per peer, reason and window, the rest counted
        (`RefusalTally`), and slowed (`FailureThrottle`), so a flood neither fills the disk
        nor guesses fast. A valid token never comes here, so the owner is never slowed."""
        peer = request.remote or "unix"
        # Any local process may bind any 127/8 source address, so loopback peers share
        # one bucket: rotating addresses must not reset the slowdown nor open new windows.
        bucket = "loopback" if _host_is_loopback(peer) else peer
        request["refused"] = True  # the tally's lines stand in for the per-request log line
        delay = self.throttle.penalty(bucket)
        first = {"reason": reason, "peer": peer, "status": status,
                 "route": request.path[:200], **fields}
        if self.refusals.first(event, bucket, first, delay):
            self.record(event, **first)
            log.warning(event, **first, delay_ms=round(delay * 1000))
        await asyncio.sleep(delay)

    def flush_refusals(self, *, everything: bool = False) -> None:
        """Write the refusals counted in windows that closed (all of them at shutdown)."""
        for event, fields, delay in self.refusals.closed(everything=everything):
            self.record_safely(event, **fields)
            log.warning(event, **fields, delay_ms=round(delay * 1000))

    def check_audit(self) -> None:
        """Before acting: 503 while the log's file system is full or read-only; and while
        the log is broken, each request first tries to write again (or is 503)."""
        if not self.service.audit_log.has_room():
            self.audit_broken = True
            raise AuditUnavailable(f"the audit log {self.service.home.audit} has no room (its "
                                   "file system is full or read-only); the request was refused")
        if self.audit_broken:
            self.record("audit.resumed")

    # --- secrets: metadata is re-read only when another process committed a change -------

    def refresh(self, *, force: bool = False) -> None:
        """Re-read secrets and consumer tokens when another process committed a change
        (`PRAGMA data_version`), or after the daemon's own change (`force`)."""
        version = self.service.metadata.data_version()
        if version == self._data_version and not force:
            return
        self._data_version = version
        generation = self.service.metadata.generation()
        if generation == self._generation and not force:
            return  # a commit that touched neither secrets nor tokens
        self._generation = generation
        fresh = {m.ref: (m.version, m.provider) for m in self.service.metadata.all()}
        for ref, (old, _provider) in self._secrets.items():
            new = fresh.get(ref)
            if new is None or new[0] != old:
                self._values.pop(ref, None)
                self.access.secret_changed(ref, None if new is None else new[0])
        self._secrets = fresh
        self.auth.consumer_tokens = {
            t.hash: ConsumerToken(t.id, t.consumer, parse_rfc3339(t.expires_at),
                                  t.revoked_at is not None, t.daily_tokens)
            for t in self.service.metadata.tokens()}
        self.end_leases_of_dead_tokens()

    def end_leases_of_dead_tokens(self) -> None:
        """A revoked or expired token's consumer loses its leases at once (they are
        minted again on demand for a token that still works)."""
        now = time.time()
        for token in self.auth.consumer_tokens.values():
            dead = token.revoked or (token.expires_at is not None and now >= token.expires_at)
            if dead and token.token_id not in self._ended_tokens:
                self._ended_tokens.add(token.token_id)
                self.access.consumer_ended(token.consumer, f"token {token.token_id} ended")

    def secret_version(self, ref: str) -> int:
        # No refresh here: the auth middleware refreshed at the start of this request.
        found = self._secrets.get(ref)
        if found is None:
            raise SecretNotFound(f"no secret @{ref}; add it with `secret-broker add @{ref}`")
        return found[0]

    def value(self, ref: str, version: int) -> str:
        self._used.add(ref)  # last-used times are written in the background, once a second
        return self._value(ref, version)

    def stored_values(self) -> list[str]:
        """Every stored value that can be read, to scrub an answer with (not a use)."""
        values = []
        for ref, (version, _provider) in list(self._secrets.items()):
            with contextlib.suppress(SecretUnavailable):  # unread, so never sent anywhere
                values.append(self._value(ref, version))
        return values

    def _value(self, ref: str, version: int) -> str:
        cached = self._values.get(ref)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            value = self.service.value(ref)  # refuses a value its metadata does not record
        except (SecretNotFound, UnlockFailed, InsecureFile) as exc:
            raise SecretUnavailable(f"the value of @{ref} cannot be read: {exc.message}") from None
        self._values[ref] = (version, value)
        return value

    def secret_for(self, provider: Provider) -> str:
        """SPEC §7: the provider's configured secret_ref, else its one secret."""
        if provider.secret_ref is not None:
            return provider.secret_ref
        refs = [r for r, (_v, p) in self._secrets.items() if p == provider.name]
        if len(refs) == 1:
            return refs[0]
        if not refs:
            raise SecretUnavailable(
                f"no secret for provider {provider.name}: add one with `secret-broker add "
                f"@{provider.name}_api_key --provider {provider.name} --kind api_key --stdin`")
        raise SecretUnavailable(
            f"several secrets for provider {provider.name} ({', '.join(sorted(refs))}): set "
            f"[providers.{provider.name}] secret_ref in config.toml or send X-Broker-Secret-Ref")

    def reserve_budget(self, principal: Principal, estimate: int) -> Reservation | None:
        """Hold `estimate` tokens of a consumer token's daily budget, or 429."""
        if principal.daily_tokens is None or principal.token_id is None:
            return None
        reservation = self.budgets.reserve(principal.token_id, utc_day(), principal.daily_tokens,
                                           estimate)
        if reservation is None:
            raise BudgetExceeded(
                f"consumer {principal.consumer!r} has used its daily budget of "
                f"{principal.daily_tokens} tokens (token {principal.token_id}); it resets at "
                "00:00 UTC, or the owner can issue a token with a larger --daily-tokens")
        return reservation

    def flush_usage(self, metadata: Metadata) -> None:
        """Fold usage into metadata.db; runs in a thread with its own connection."""
        rows, spent = self.usage.drain(), self.budgets.drain()
        if rows or spent:
            metadata.add_usage(rows, spent)

    def flush_last_used(self) -> None:
        used, self._used = self._used, set()
        for ref in used:
            self.service.touch(ref)
        tokens, self.tokens_used = self.tokens_used, set()
        for token_id in tokens:
            self.service.metadata.touch_token(token_id, rfc3339())


# --- helpers --------------------------------------------------------------------------------


def via(request: web.Request) -> str:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return "unix" if isinstance(sockname, str) or sockname is None else "tcp"


def consumer_of(request: web.Request) -> str:
    principal: Principal = request["principal"]
    if len(request.headers.getall("X-Broker-Consumer", [])) > 1:  # which one would win?
        raise UsageError("send X-Broker-Consumer once")
    claimed = request.headers.get("X-Broker-Consumer")
    if claimed is not None and not CONSUMER_RE.fullmatch(claimed):
        raise UsageError("X-Broker-Consumer must be 1-128 of A-Z a-z 0-9 _ . -")
    if principal.consumer is not None:
        if claimed is not None and claimed != principal.consumer:
            raise Forbidden(f"this token belongs to consumer {principal.consumer!r}",
                            code="consumer_mismatch")
        return principal.consumer
    return claimed or request.app[STATE].config.default_consumer


def lease_json(lease: Lease) -> dict[str, Any]:
    return {"lease_id": lease.lease_id, "consumer": lease.consumer,
            "secret_ref": lease.secret_ref, "purpose": lease.purpose,
            "delivery": lease.delivery, "host": lease.host,
            "issued_at": rfc3339(lease.issued_at), "expires_at": rfc3339(lease.expires_at)}


def error_response(request: web.Request, exc: BrokerError) -> web.Response:
    state = request.app[STATE]
    name = routes.provider_name(request.raw_path)
    provider = state.providers.get(name) if name else None
    shape = provider.error_shape if provider is not None else "openai"
    headers = {"Content-Type": "application/json"}
    if 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
        headers["x-should-retry"] = "false"
    return web.Response(status=exc.status, headers=headers,
                        body=error_body(shape, exc.status, exc.code, exc.message))


def _from_http(exc: web.HTTPException) -> BrokerError:
    """aiohttp's own HTTP errors (unknown /v1 route, wrong method, body limit) in our shape."""
    if exc.status == 404:
        return RouteNotFound(f"no route {exc.reason}")
    err = BrokerError(exc.text or exc.reason, code={405: "method_not_allowed",
                                                     413: "body_too_large"}.get(exc.status,
                                                                                "bad_request"))
    err.status = exc.status
    return err


# --- middlewares ----------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every failure becomes JSON in the caller's shape; one log line per request."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except BrokerError as exc:
        response = error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(request, _from_http(exc))
    state = request.app[STATE]
    state.requests[str(response.status)] += 1
    if not request.get("refused"):  # refusals are logged once per window (BrokerState.refuse)
        log.info("request", method=request.method, route=request.get("route", request.path),
                 status=response.status, consumer=request.get("consumer"),
                 lease_id=request.get("lease_id"),
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))
    return response


def _host_is_loopback(host: str | None) -> bool:
    if not host:
        return False
    name = host.lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS-rebinding and cross-site defence, before authentication, on every route."""
    refusal = None
    if request.path.startswith(ui.PREFIX):  # the dashboard: its own page may call it
        refusal = ui.refusal(request.method, request.path, request.headers,
                             ui.port_of(request.app[STATE].listen))
    elif not _host_is_loopback(request.headers.get("Host")):
        refusal = ("host_header_refused", "the Host header is not a loopback name")
    elif "Origin" in request.headers:
        refusal = ("origin_not_allowed", "requests from web pages (with an Origin) are refused")
    if refusal is not None:
        await request.app[STATE].refuse(request, "request.refused", refusal[0], 403)
        raise Forbidden(refusal[1], code=refusal[0])
    return await handler(request)


OWNER_ONLY = ("/v1/admin/", "/ui/api/")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one authentication step: any token (or the socket) becomes a Principal."""
    if ui.needs_no_token(request.method, request.path):
        return await handler(request)
    state = request.app[STATE]
    places: tuple[str, ...] = ("authorization",)
    name = routes.provider_name(request.raw_path)
    if name in state.providers:
        places = state.providers[name].caller_auth
    token = presented_token(request.headers, places)
    state.refresh()  # a token created or revoked a moment ago counts at once
    try:
        principal = state.auth.authenticate(token, via(request),
                                            dashboard=request.path.startswith(ui.API))
    except Unauthorized as exc:
        await state.refuse(request, "auth.failed", "missing" if token is None else "invalid",
                           401, token_id=exc.token_id)
        raise
    if principal.kind == "consumer" and request.path.startswith(OWNER_ONLY):
        raise Forbidden("only the owner's token or the Unix socket may use this route",
                        code="owner_only")
    request["principal"] = principal
    request["broker_tokens"] = state.auth.broker_tokens(token)  # never forwarded upstream
    if principal.token_id is not None:
        state.tokens_used.add(principal.token_id)
    return await handler(request)


# --- /v1 handlers ---------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def status(request: web.Request) -> web.Response:
    """The owner sees everything; a consumer token only what is its own (no grants file
    error, no other consumer's counts, nothing of the backend or the files)."""
    state = request.app[STATE]
    principal: Principal = request["principal"]
    if principal.consumer is not None:
        own = [lease for lease in state.access.table.list()
               if lease.consumer == principal.consumer]
        return web.json_response({
            "status": "ok", "version": __version__,
            "uptime_secs": round(time.time() - state.started, 1),
            "consumer": principal.consumer, "leases": {"active": len(own)}})
    grants = state.access.state
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "pid": os.getpid(),
        "uptime_secs": round(time.time() - state.started, 1),
        "backend": state.service.backend,
        "listen": state.listen,
        "socket": str(state.service.home.socket),
        "service_manager": hardening.service_manager(),
        "grants": {"valid": grants.valid, "count": len(grants.grants), "error": grants.error,
                   "loaded_at": rfc3339(grants.loaded_at)},
        "leases": {"active": len(state.access.table)},
        "requests": dict(state.requests),
    })


JSON_LIMIT = 64 << 10  # a JSON route's body: a secret's value and its metadata fit easily


async def read_body(request: web.Request, limit: int, setting: str) -> bytes:
    """The body, or 413 past `limit` bytes: at once when Content-Length says so, else as
    soon as a chunked body passes it (what comes after is never kept)."""
    too_large = BodyTooLarge(f"the request body is larger than {limit} bytes ({setting})")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def json_body(request: web.Request, limit: int = JSON_LIMIT) -> dict[str, Any]:
    raw = await read_body(request, limit, "the most this route accepts")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: 400, not a 500
        raise UsageError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    return body


async def create_lease(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    fields = {k: body.get(k) for k in ("secret_ref", "purpose", "delivery")}
    for key, value in fields.items():
        if not isinstance(value, str) or not value:
            raise UsageError(f"{key} is required and must be a non-empty string")
    unknown = set(body) - set(fields)
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if fields["delivery"] not in DELIVERIES:
        raise UsageError(f"delivery must be one of {', '.join(sorted(DELIVERIES))}")
    ref = parse_ref(str(fields["secret_ref"]))
    consumer = request["consumer"] = consumer_of(request)
    version = state.secret_version(ref)
    state.check_audit()
    lease = state.access.acquire(
        AccessRequest(consumer, ref, str(fields["purpose"]), str(fields["delivery"]), None),
        version)
    request["lease_id"] = lease.lease_id
    doc = lease_json(lease)
    doc["ttl_secs"] = round(lease.expires_at - lease.issued_at)
    if lease.delivery == "native":
        doc["value"] = state.value(ref, version)
    return web.json_response(doc, status=201)


async def list_leases(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal: Principal = request["principal"]
    leases = [lease for lease in state.access.table.list()
              if principal.consumer is None or lease.consumer == principal.consumer]
    return web.json_response({"leases": [lease_json(lease) for lease in leases]})


async def revoke_lease(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal: Principal = request["principal"]
    lease_id = request.match_info["lease_id"]
    lease = state.access.table.get(lease_id)
    if lease is None or (principal.consumer is not None and lease.consumer != principal.consumer):
        raise NotFound(f"no active lease {lease_id}", code="lease_not_found")
    state.access.revoke(lease_id, "revoked by request")
    return web.json_response({"lease_id": lease_id, "revoked": True})


# --- what a consumer may see of its own access (the MCP server uses these) ----------------


async def my_grants(request: web.Request) -> web.Response:
    """The grants of the caller's consumer, with each secret's provider and kind."""
    state = request.app[STATE]
    consumer = request["consumer"] = consumer_of(request)
    metas = {m.ref: m for m in state.service.metadata.all()}
    rows = []
    for row in grants_as_rows(g for g in state.access.state.grants if g.consumer == consumer):
        meta = metas.get(str(row["secret_ref"]))
        rows.append({**row, "provider": meta.provider if meta else None,
                     "kind": meta.kind if meta else None, "exists": meta is not None})
    return web.json_response({"consumer": consumer, "grants": rows})


async def my_explain(request: web.Request) -> web.Response:
    """Would the caller's consumer be allowed? Defaults: header injection to the secret's
    provider host, as a gateway call would ask."""
    state = request.app[STATE]
    body = await json_body(request)
    consumer = request["consumer"] = consumer_of(request)
    unknown = set(body) - {"secret_ref", "purpose", "delivery", "host"}
    mistyped = [k for k, v in body.items() if not isinstance(v, str)]
    if unknown or mistyped or "secret_ref" not in body:
        raise UsageError("send string fields {\"secret_ref\", \"purpose\"} "
                         "(optional: delivery, host)")
    ref = parse_ref(body["secret_ref"])
    delivery = body.get("delivery") or "http_header_inject"
    host = body.get("host")
    meta = state.service.metadata.find(ref)
    if host is None and delivery == "http_header_inject" and meta is not None:
        provider = state.providers.get(meta.provider)
        host = provider.host if provider is not None else None
    decision = state.access.decide(AccessRequest(consumer, ref, body.get("purpose"), delivery,
                                                 host))
    return web.json_response(explain_as_json(decision))


async def mcp_tool_called(request: web.Request) -> web.Response:
    """The MCP server records each tool call here before making it (no audit, no action)."""
    from broker.core.protocol import TOOLS

    state = request.app[STATE]
    body = await json_body(request)
    consumer = request["consumer"] = consumer_of(request)
    if set(body) != {"tool"} or body["tool"] not in TOOLS:
        raise UsageError(f"send {{\"tool\"}} naming one of {', '.join(TOOLS)}")
    state.check_audit()
    state.record("mcp.tool_called", consumer=consumer, tool=body["tool"], outcome="called")
    return web.json_response({"consumer": consumer, "tool": body["tool"]}, status=201)


# --- wiring ---------------------------------------------------------------------------------


def create_app(state: BrokerState) -> web.Application:
    from broker.server import admin
    from broker.server import gateway as proxy

    app = web.Application(
        middlewares=[errors_middleware, guard_middleware, auth_middleware],
        client_max_size=state.config.max_body_bytes,
    )
    app[STATE] = state
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/leases", create_lease)
    app.router.add_get("/v1/leases", list_leases)
    app.router.add_delete("/v1/leases/{lease_id}", revoke_lease)
    app.router.add_get("/v1/grants", my_grants)
    app.router.add_post("/v1/explain", my_explain)
    app.router.add_post("/v1/mcp/tool-called", mcp_tool_called)
    app.router.add_get("/v1/usage", admin.usage)
    app.router.add_route("*", "/proxy/{tail:.*}", proxy.handle)
    admin.add_routes(app, "/v1/admin")
    ui.mount(app)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    return app


def parse_listen(listen: str, allow_remote: bool) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {listen!r}: use HOST:PORT, e.g. 127.0.0.1:18443")
    if not _host_is_loopback(host):
        if not allow_remote:
            raise UsageError(
                f"refusing to listen on non-loopback address {host}: anyone who can reach it "
                "could try tokens; pass --allow-remote if you really mean it")
        log.warning("listen.non_loopback", host=host)
    return host, int(port_text)


def _bind_unix(path: Path) -> socket.socket:
    """Bind the socket in run/ (checked by `_take_pid_lock`): a stale socket there is replaced,
    anything else refused."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(found.st_mode):
            raise InsecureFile(f"{path} is not a socket; remove it (rm {path})")
        path.unlink()  # stale: we hold the pid lock, and no broker answers on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}{_held_by(port)}; is "
                          "another broker running? (secret-broker status) or pick --listen "
                          "HOST:PORT") from None
    return sock


def _answers(path: Path) -> bool:
    """Whether a process listens on the Unix socket at `path` (a stale one refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except TimeoutError:
            return True  # listening, its backlog full
        return True


def _held_by(port: int) -> str:
    """Who listens on a busy port, where the kernel shows it: another user may have taken
    it to collect the tokens that clients send there."""
    found = netowner.listener(netowner.read() or [], port)
    return "" if found is None else f" (held by {netowner.holder(found)})"


def _take_pid_lock(home: Home) -> int:
    """Lock the pid file; refuse while another broker holds it, or answers on the socket
    (its pid file deleted: the lock went with it)."""
    private_dir(home.run)
    fd = open_private(home.pid, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BrokerError(f"another broker is already running for {home.root} "
                          "(see `secret-broker status`)") from None
    if _answers(home.socket):
        os.close(fd)
        raise BrokerError(f"another broker is already running for {home.root}: it answers on "
                          f"{home.socket}, though {home.pid} was removed (see `secret-broker "
                          "status`)")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def serve(home: Home, *, listen: str | None = None, log_format: str | None = None,
          allow_remote: bool = False, environ: dict[str, str] | None = None) -> int:
    """Run in the foreground until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    logs.configure(log_format)
    hardening.apply()
    home.require()
    for path in (home.root, home.token, home.audit, home.vault, home.vault_key):
        check_private(path)
    config = load_config(home)
    service = Service(home, environ, actor="broker", audit_fsync=config.audit_fsync)
    host, port = parse_listen(listen or config.listen, allow_remote)
    pid_fd = _take_pid_lock(home)
    bound: os.stat_result | None = None
    try:
        try:
            service.store.get("!instance-key")  # unlock once, now, and fail fast
        except BrokerError as exc:
            raise type(exc)(f"cannot start: {exc.message}") from None
        hardening.forget_passphrase()
        state = BrokerState(service, config)
        tcp = _bind_tcp(host, port)
        unix = _bind_unix(home.socket)
        bound = home.socket.lstat()
        state.listen = "{}:{}".format(*tcp.getsockname()[:2])
        return _run(state, [unix, tcp])
    finally:
        if bound is not None:
            _remove_own_socket(home.socket, bound)
        os.close(pid_fd)


def _remove_own_socket(path: Path, bound: os.stat_result) -> None:
    """Unlink the socket this daemon bound, never another one now at that path (a newer
    broker's, after ours was removed)."""
    with contextlib.suppress(FileNotFoundError):
        now = path.lstat()
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            path.unlink()


def _run(state: BrokerState, socks: list[socket.socket]) -> int:
    try:
        import uvloop

        runner_factory: Any = uvloop.new_event_loop
    except ImportError:
        runner_factory = None
    with asyncio.Runner(loop_factory=runner_factory) as runner:
        return runner.run(_main(state, socks))


async def _main(state: BrokerState, socks: list[socket.socket]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    state.access.reload("startup")
    state.refresh()
    app = create_app(state)
    # aiohttp's keep-alive timer runs from a connection's start (and from each response's
    # end) until a request's headers are complete: it is the header-read timeout too.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           access_log=None, shutdown_timeout=30.0,
                           keepalive_timeout=state.config.header_timeout_secs)
    await runner.setup()
    gc.freeze()  # start-up objects live forever: keep them out of every collection
    for sock in socks:
        await web.SockSite(runner, sock, backlog=1024).start()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: state.access.reload("SIGHUP"))
    state.record("broker.started", pid=os.getpid(), backend=state.service.backend)
    log.info("broker.started", listen=state.listen, socket=str(state.service.home.socket),
             pid=os.getpid(), version=__version__)
    usage_db = Metadata(state.service.home.metadata)  # the flush thread's own connection
    background = [asyncio.create_task(_every(0.1, lambda: _flush_audit(state))),
                  asyncio.create_task(_every(1.0, lambda: _in_thread(state.flush_usage,
                                                                     usage_db))),
                  asyncio.create_task(_every(1.0, lambda: _housekeeping(state)))]
    await stop.wait()
    log.info("broker.stopping")
    await runner.cleanup()  # stops accepting, lets in-flight requests finish (30 s at most)
    for task in background:
        task.cancel()
    state.flush_last_used()
    state.flush_usage(usage_db)
    state.flush_refusals(everything=True)
    with contextlib.suppress(BrokerError):
        state.record("broker.stopped", pid=os.getpid())
    state.service.audit_log.close()
    log.info("broker.stopped")
    return 0


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception as exc:
            log.error("background.failed", error=type(exc).__name__, detail=str(exc)[:200])


async def _in_thread(job: Callable[..., None], *args: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, job, *args)


async def _flush_audit(state: BrokerState) -> None:
    if state.service.audit_log.pending:  # an idle broker wakes no thread (and takes no GIL)
        await _in_thread(state.service.audit_log.flush)


async def _housekeeping(state: BrokerState) -> None:
    state.access.reload_if_changed()
    state.refresh()
    state.end_leases_of_dead_tokens()  # tokens expire without any commit to notice
    state.flush_last_used()
    state.flush_refusals()

