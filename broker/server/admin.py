"""The admin API (SPEC §11): thin adapters from JSON to the service layer.

Owner only (the auth middleware refuses consumer tokens with 403 `owner_only`). Values are
write-only: no route returns one. Every mutation is audited with actor `admin` by the
service layer, exactly as its CLI twin is with actor `cli`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from broker.core.clock import rfc3339
from broker.core.errors import UsageError
from broker.server.app import STATE, VALUE_JSON_LIMIT, json_body
from broker.service.queries import Queries
from broker.service.secrets import Secrets
from broker.service.tokens import Tokens
from grants import AccessRequest
from grants.render import explain_as_json, grants_as_rows


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
    state = request.app[STATE]
    return web.json_response({"secrets": [m.as_json() for m in Secrets(state.admin).all()]})


async def add_secret(request: web.Request) -> web.Response:
    state = request.app[STATE]
    f = _fields(await json_body(request, VALUE_JSON_LIMIT), ("ref", "provider", "kind", "value"))
    meta = Secrets(state.admin).add(_str(f["ref"]), _str(f["provider"]), _str(f["kind"]),
                                    _str(f["value"]))
    state.refresh(force=True)
    return web.json_response(meta.as_json(), status=201)


async def inspect_secret(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(Secrets(state.admin).inspect(request.match_info["ref"]).as_json())


async def rotate_secret(request: web.Request) -> web.Response:
    state = request.app[STATE]
    f = _fields(await json_body(request, VALUE_JSON_LIMIT), ("value",))
    meta = Secrets(state.admin).rotate(request.match_info["ref"], _str(f["value"]))
    state.refresh(force=True)
    return web.json_response(meta.as_json())


async def remove_secret(request: web.Request) -> web.Response:
    state = request.app[STATE]
    meta = Secrets(state.admin).remove(request.match_info["ref"])
    state.refresh(force=True)
    return web.json_response({"removed": meta.ref})


# --- grants -----------------------------------------------------------------------------------


async def show_grants(request: web.Request) -> web.Response:
    state = request.app[STATE]
    current = state.access.state
    return web.json_response({
        "file": str(state.service.home.grants), "valid": current.valid, "error": current.error,
        "loaded_at": rfc3339(current.loaded_at), "grants": grants_as_rows(current.grants)})


async def explain(request: web.Request) -> web.Response:
    state = request.app[STATE]
    f = _fields(await json_body(request), ("consumer", "secret_ref", "delivery"),
                ("purpose", "host"))
    decision = state.access.decide(AccessRequest(
        _str(f["consumer"]), _str(f["secret_ref"]), f["purpose"], _str(f["delivery"]), f["host"]))
    return web.json_response(explain_as_json(decision))


# --- consumer tokens --------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"tokens": [t.as_json() for t in Tokens(state.admin).all()]})


async def create_token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    daily = body.pop("daily_tokens", None)
    if daily is not None and (not isinstance(daily, int) or isinstance(daily, bool)):
        raise UsageError("daily_tokens must be a whole number")
    f = _fields(body, ("consumer",), ("ttl", "description"))
    meta, token = Tokens(state.admin).create(_str(f["consumer"]), f["ttl"], f["description"],
                                             daily)
    state.refresh(force=True)
    return web.json_response({**meta.as_json(), "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    revoked = Tokens(state.admin).revoke(token_id=request.match_info["token_id"])
    state.refresh(force=True)
    return web.json_response({"revoked": [t.id for t in revoked]})


# --- audit ------------------------------------------------------------------------------------


AUDIT_PAGE = 1000  # events per answer when no limit is asked for
AUDIT_PAGE_MAX = 10_000


async def audit_events(request: web.Request) -> web.Response:
    """The newest matching events, newest last; read from the log's end in a thread, so a
    large log neither blocks the event loop nor is loaded whole."""
    state = request.app[STATE]
    q = request.query
    limit_text = q.get("limit") or str(AUDIT_PAGE)
    if not (limit_text.isdigit() and 0 < int(limit_text) <= AUDIT_PAGE_MAX):
        raise UsageError(f"limit must be a whole number from 1 to {AUDIT_PAGE_MAX}")
    events = await asyncio.to_thread(
        Queries(state.admin).audit_events, ref=q.get("ref") or None, event=q.get("event") or None,
        since=q.get("since") or None, limit=int(limit_text))
    return web.json_response({"events": events})


async def audit_verify(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # In a thread: verifying reads the whole log. Flush first: verify what has been
    # acknowledged, checkpoint included.
    await asyncio.to_thread(state.service.audit_log.flush)
    verdict = await asyncio.to_thread(Queries(state.admin).verify_audit)
    return web.json_response(verdict.as_json())


async def usage(request: web.Request) -> web.Response:
    """Usage (SPEC §15); the owner sees every consumer, a consumer token only its own."""
    state = request.app[STATE]
    state.flush_usage(state.service.metadata)  # include what the last second added
    principal = request["principal"]
    rows = Queries(state.admin).usage(since=request.query.get("since") or None,
                                      by=request.query.get("group_by") or None,
                                      consumer=principal.consumer)
    return web.json_response({"usage": [r.as_json() for r in rows]})


def add_routes(app: web.Application, prefix: str) -> None:
    """Mount the admin routes under `prefix` (`/v1/admin`; the dashboard mounts them too)."""
    r = app.router
    r.add_get(f"{prefix}/secrets", list_secrets)
    r.add_post(f"{prefix}/secrets", add_secret)
    r.add_get(f"{prefix}/secrets/{{ref}}", inspect_secret)
    r.add_put(f"{prefix}/secrets/{{ref}}", rotate_secret)
    r.add_delete(f"{prefix}/secrets/{{ref}}", remove_secret)
    r.add_get(f"{prefix}/grants", show_grants)
    r.add_post(f"{prefix}/grants/explain", explain)
    r.add_get(f"{prefix}/tokens", list_tokens)
    r.add_post(f"{prefix}/tokens", create_token)
    r.add_delete(f"{prefix}/tokens/{{token_id}}", revoke_token)
    r.add_get(f"{prefix}/audit", audit_events)
    r.add_get(f"{prefix}/audit/verify", audit_verify)
    r.add_get(f"{prefix}/usage", usage)
