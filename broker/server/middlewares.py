"""The middlewares every request passes, outermost first: errors (and the request log),
the Host/Origin guard, authentication."""

from __future__ import annotations

import secrets
import time
import traceback
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from multidict import MultiMapping

from broker.core.errors import BrokerError, Forbidden, RouteNotFound, Unauthorized
from broker.core.loopback import LOOPBACK_NAMES, is_loopback_host
from broker.gateway import routes
from broker.gateway.providers import error_body
from broker.server.auth import presented_token
from broker.server.state import AUDIT, AUTH, CONFIG, SECRETS, SERVER

log = structlog.get_logger("broker")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OWNER_ONLY = ("/v1/admin/", "/ui/api/")
REQUEST_ID = "X-Request-Id"
# The dashboard's paths (its handlers are in ui.py); the guard below is its first defence.
PREFIX = "/ui/"
API = "/ui/api/"
SESSION = "/ui/api/session"
CODE = "/v1/admin/ui/code"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    # Beyond §12: no other page may embed a /ui/ response, nor keep a handle on our window.
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}




def via(request: web.Request) -> str:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return "unix" if isinstance(sockname, str) or sockname is None else "tcp"


def error_response(request: web.Request, exc: BrokerError) -> web.Response:
    name = routes.provider_name(request.raw_path)
    provider = request.app[CONFIG].providers.get(name) if name else None
    shape = provider.error_shape if provider is not None else "openai"
    headers = {"Content-Type": "application/json"}
    if 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
        headers["x-should-retry"] = "false"
    return web.Response(status=exc.status, headers=headers,
                        body=error_body(shape, exc.status, exc.code, _told(request, exc)))


def _told(request: web.Request, exc: BrokerError) -> str:
    """The message, with its detail for the owner (or the dashboard) only: a detail may name
    paths on this machine, which a consumer must not learn (as from /v1/status)."""
    if exc.detail is None:
        return exc.message
    principal = request.get("principal")
    if principal is not None and principal.kind != "consumer":
        return f"{exc.message}: {exc.detail}"
    log.warning("error.detail_withheld", route=request.path, code=exc.code, detail=exc.detail)
    return f"{exc.message}; the broker's log says why"


def _from_http(exc: web.HTTPException) -> BrokerError:
    """aiohttp's own HTTP errors (unknown /v1 route, wrong method, body limit) in our shape."""
    if exc.status == 404:
        return RouteNotFound(f"no route {exc.reason}")
    err = BrokerError(exc.text or exc.reason, code={405: "method_not_allowed",
                                                     413: "body_too_large"}.get(exc.status,
                                                                                "bad_request"))
    err.status = exc.status
    return err


def _internal(request: web.Request, exc: Exception) -> web.Response:
    """A failure nobody foresaw (a database error, a bug): logged once under a request id,
    which the caller gets instead of the exception's text. The log has the exception's
    type and where it was raised, not its message: that may quote a value or a token (as
    aiohttp's own error logs may, see `logs._ErrorTypeOnly`)."""
    request_id = secrets.token_hex(8)
    log.error("request.failed", request_id=request_id, method=request.method,
              route=request.get("route", request.path[:200]), error=type(exc).__name__,
              traceback="".join(traceback.format_tb(exc.__traceback__))[-8000:])
    response = error_response(request, BrokerError(
        f"the broker failed on this request (request id {request_id}); its log has the "
        "details under that id", code="internal_error"))
    response.headers[REQUEST_ID] = request_id
    return response


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
    except Exception as exc:  # never its text to the caller: it may name files, SQL, values
        response = _internal(request, exc)
    request.app[SERVER].requests[str(response.status)] += 1
    if not request.get("refused"):  # refusals are logged once per window (AuditRecorder)
        log.info("request", method=request.method, route=request.get("route", request.path),
                 status=response.status, consumer=request.get("consumer"),
                 lease_id=request.get("lease_id"),
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))
    return response


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS-rebinding and cross-site defence, before authentication, on every route."""
    refusal = None
    if request.path.startswith(PREFIX):  # the dashboard: its own page may call it
        refusal = dashboard_refusal(request.method, request.path, request.headers,
                                    port_of(request.app[SERVER].listen))
    elif not is_loopback_host(request.headers.get("Host")):
        refusal = ("host_header_refused", "the Host header is not a loopback name")
    elif "Origin" in request.headers:
        refusal = ("origin_not_allowed", "requests from web pages (with an Origin) are refused")
    if refusal is not None:
        await request.app[AUDIT].refuse(request, "request.refused", refusal[0], 403)
        raise Forbidden(refusal[1], code=refusal[0])
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one authentication step: any token (or the socket) becomes a Principal."""
    if needs_no_token(request.method, request.path):
        return await handler(request)
    auth, cache = request.app[AUTH], request.app[SECRETS]
    providers = request.app[CONFIG].providers
    places: tuple[str, ...] = ("authorization",)
    name = routes.provider_name(request.raw_path)
    if name in providers:
        places = providers[name].caller_auth
    token = presented_token(request.headers, places)
    cache.refresh()  # a token created or revoked a moment ago counts at once
    try:
        principal = auth.authenticate(token, via(request),
                                      dashboard=request.path.startswith(API))
    except Unauthorized as exc:
        await request.app[AUDIT].refuse(request, "auth.failed",
                                        "missing" if token is None else "invalid", 401,
                                        token_id=exc.token_id)
        raise
    if principal.kind == "consumer" and request.path.startswith(OWNER_ONLY):
        raise Forbidden("only the owner's token or the Unix socket may use this route",
                        code="owner_only")
    request["principal"] = principal
    request["broker_tokens"] = auth.broker_tokens(token)  # never forwarded upstream
    if principal.token_id is not None:
        cache.tokens_used.add(principal.token_id)
    return await handler(request)


# --- the dashboard's guard (pure) ------------------------------------------------------


def dashboard_refusal(method: str, path: str, headers: MultiMapping[str],
            port: int) -> tuple[str, str] | None:
    """Why a `/ui/` request is refused, as (code, message), or None to let it through.

    The browser says where a request comes from (`Origin`, `Sec-Fetch-Site`); another
    local page, even on another loopback port, is "same-site" but never "same-origin".
    A header sent twice is refused: which copy would a proxy or a parser believe?
    """
    hosts = headers.getall("Host", [])
    host = hosts[0].lower() if len(hosts) == 1 else ""
    if host not in {f"{name}:{port}" for name in LOOPBACK_NAMES}:
        return ("host_header_refused",
                f"the dashboard answers only to Host 127.0.0.1:{port} or localhost:{port}")
    origins = headers.getall("Origin", [])
    if origins and origins != [f"http://{host}"]:
        return ("origin_not_allowed", "the dashboard answers only its own page (Origin)")
    site = headers.getall("Sec-Fetch-Site", [])
    if site in ([], ["same-origin"]):
        return None
    # A top-level GET navigation of the page itself: typed into the address bar ("none"),
    # or sent on by the file that `secret-broker ui` opens (a file: page is "cross-site").
    # The page holds no data and signs in only with a code the owner minted; frames
    # (Sec-Fetch-Dest iframe, and frame-ancestors) and the API stay refused.
    if (method == "GET" and not path.startswith(API)
            and headers.getall("Sec-Fetch-Mode", []) == ["navigate"]
            and (site == ["none"] or headers.getall("Sec-Fetch-Dest", []) == ["document"])):
        return None
    return ("origin_not_allowed", "the dashboard answers only its own page (Sec-Fetch-Site)")


def needs_no_token(method: str, path: str) -> bool:
    """The page and its files hold no data; the login trades a code, not a token."""
    if path.startswith(API):
        return method == "POST" and path == SESSION
    return path.startswith(PREFIX)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every /ui/ response, errors and refusals included."""
    if request.path.startswith(PREFIX):
        response.headers.update(HEADERS)
