"""The admin API: thin adapters from JSON to the service layer.

Owner only (the auth middleware refuses consumer tokens with 403 `owner_only`). Values are
write-only: no route returns one. Every mutation is audited with actor `admin` by the
service layer, exactly as its CLI twin is with actor `cli`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from broker.core.clock import rfc3339
from broker.core.errors import UsageError
from broker.server.inputs import VALUE_JSON_LIMIT, json_body
from broker.server.state import ACCESS, ADMIN, SECRETS, SERVICE
from broker.server.teams import TEAMS
from broker.service.queries import Queries
from broker.service.secrets import Secrets
from broker.service.tokens import Tokens
from grants import AccessRequest
from grants.render import explain_as_json, grants_as_rows

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _fields(body: dict[str, Any], required: tuple[str, ...],
            optional: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Strict string fields: a missing, mistyped or unknown field is a 400 naming it."""
    unknown = set(body) - set(required) - set(optional)
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    out: dict[str, str | None] = {}
    for key in (*required, *optional):
        value = body.get(key)
        if value is None and key in optional:
            out[key] = None
            continue
        if not isinstance(value, str) or not value:
            raise UsageError(f"{key} is required and must be a non-empty string")
        out[key] = value
    return out


def _str(value: str | None) -> str:
    assert value is not None  # _fields guarantees required fields
    return value


# --- secrets ----------------------------------------------------------------------------------


async def list_secrets(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    local = [m.as_json() for m in Secrets(admin).all()]
    return web.json_response({"secrets": local + request.app[TEAMS].secrets_json()})


async def add_secret(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    f = _fields(await json_body(request, VALUE_JSON_LIMIT), ("ref", "provider", "kind", "value"))
    meta = Secrets(admin).add(_str(f["ref"]), _str(f["provider"]), _str(f["kind"]),
                              _str(f["value"]))
    request.app[SECRETS].refresh(force=True)
    return web.json_response(meta.as_json(), status=201)


async def inspect_secret(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    return web.json_response(Secrets(admin).inspect(request.match_info["ref"]).as_json())


async def rotate_secret(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    f = _fields(await json_body(request, VALUE_JSON_LIMIT), ("value",))
    meta = Secrets(admin).rotate(request.match_info["ref"], _str(f["value"]))
    request.app[SECRETS].refresh(force=True)
    return web.json_response(meta.as_json())


async def remove_secret(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    meta = Secrets(admin).remove(request.match_info["ref"])
    request.app[SECRETS].refresh(force=True)
    return web.json_response({"removed": meta.ref})


# --- grants -----------------------------------------------------------------------------------


async def show_grants(request: web.Request) -> web.Response:
    current = request.app[ACCESS].state
    return web.json_response({
        "file": str(request.app[SERVICE].home.grants), "valid": current.valid,
        "error": current.error,
        "loaded_at": rfc3339(current.loaded_at), "grants": grants_as_rows(current.grants)})


async def explain(request: web.Request) -> web.Response:
    f = _fields(await json_body(request), ("consumer", "secret_ref", "delivery"),
                ("purpose", "host"))
    decision = request.app[ACCESS].decide(AccessRequest(
        _str(f["consumer"]), _str(f["secret_ref"]), f["purpose"], _str(f["delivery"]), f["host"]))
    return web.json_response(explain_as_json(decision))


# --- consumer tokens --------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    return web.json_response({"tokens": [t.as_json() for t in Tokens(admin).all()]})


async def create_token(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    body = await json_body(request)
    daily = body.pop("daily_tokens", None)
    if daily is not None and (not isinstance(daily, int) or isinstance(daily, bool)):
        raise UsageError("daily_tokens must be a whole number")
    f = _fields(body, ("consumer",), ("ttl", "description"))
    meta, token = Tokens(admin).create(_str(f["consumer"]), f["ttl"], f["description"], daily)
    request.app[SECRETS].refresh(force=True)
    return web.json_response({**meta.as_json(), "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    revoked = Tokens(admin).revoke(token_id=request.match_info["token_id"])
    request.app[SECRETS].refresh(force=True)
    return web.json_response({"revoked": [t.id for t in revoked]})


# --- audit ------------------------------------------------------------------------------------


AUDIT_PAGE = 1000  # events per answer when no limit is asked for
AUDIT_PAGE_MAX = 10_000


async def audit_events(request: web.Request) -> web.Response:
    """The newest matching events, newest last; read from the log's end in a thread, so a
    large log neither blocks the event loop nor is loaded whole."""
    admin = request.app[ADMIN]
    q = request.query
    limit_text = q.get("limit") or str(AUDIT_PAGE)
    if not (limit_text.isdigit() and 0 < int(limit_text) <= AUDIT_PAGE_MAX):
        raise UsageError(f"limit must be a whole number from 1 to {AUDIT_PAGE_MAX}")
    events = await asyncio.to_thread(
        Queries(admin).audit_events, ref=q.get("ref") or None, event=q.get("event") or None,
        since=q.get("since") or None, limit=int(limit_text))
    return web.json_response({"events": events})


async def audit_verify(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    # In a thread: verifying reads the whole log. Flush first: verify what has been
    # acknowledged, checkpoint included.
    await asyncio.to_thread(request.app[SERVICE].audit_log.flush)
    verdict = await asyncio.to_thread(Queries(admin).verify_audit)
    return web.json_response(verdict.as_json())


# --- team vaults -----------------------------------------------------------------------------


async def list_teams(request: web.Request) -> web.Response:
    return web.json_response({"teams": request.app[TEAMS].as_json()})


async def reload_teams(request: web.Request) -> web.Response:
    """Read and verify every team's commit now (`team pull` calls it after a pull)."""
    await request.app[TEAMS].refresh(force=True)
    return web.json_response({"teams": request.app[TEAMS].as_json()})


# Mounted by the app under /v1/admin, and again under /ui/api for the dashboard.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/secrets", list_secrets),
    ("POST", "/secrets", add_secret),
    ("GET", "/secrets/{ref}", inspect_secret),
    ("PUT", "/secrets/{ref}", rotate_secret),
    ("DELETE", "/secrets/{ref}", remove_secret),
    ("GET", "/grants", show_grants),
    ("POST", "/grants/explain", explain),
    ("GET", "/tokens", list_tokens),
    ("POST", "/tokens", create_token),
    ("DELETE", "/tokens/{token_id}", revoke_token),
    ("GET", "/audit", audit_events),
    ("GET", "/audit/verify", audit_verify),
    ("GET", "/teams", list_teams),
    ("POST", "/teams/reload", reload_teams),
)
