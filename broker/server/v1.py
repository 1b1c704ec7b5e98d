"""The /v1 routes any caller may use (a consumer token sees only its own): health, status,
leases, the caller's grants and explain, the MCP server's tool record, usage."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from broker import __version__
from broker.core.clock import rfc3339
from broker.core.errors import NotFound, UsageError
from broker.core.protocol import TOOLS
from broker.core.refs import parse_ref
from broker.server import hardening
from broker.server.auth import Principal
from broker.server.inputs import consumer_of, json_body
from broker.server.state import (
    ACCESS,
    ADMIN,
    AUDIT,
    CONFIG,
    SECRETS,
    SERVER,
    SERVICE,
    SPENDING,
)
from broker.server.teams import TEAMS
from broker.service.queries import Queries
from grants import DELIVERIES, AccessRequest, Lease
from grants.render import explain_as_json, grants_as_rows


def lease_json(lease: Lease) -> dict[str, Any]:
    return {"lease_id": lease.lease_id, "consumer": lease.consumer,
            "secret_ref": lease.secret_ref, "purpose": lease.purpose,
            "delivery": lease.delivery, "host": lease.host,
            "issued_at": rfc3339(lease.issued_at), "expires_at": rfc3339(lease.expires_at)}


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def status(request: web.Request) -> web.Response:
    """The owner sees everything; a consumer token only what is its own (no grants file
    error, no other consumer's counts, nothing of the backend or the files)."""
    server, access = request.app[SERVER], request.app[ACCESS]
    principal: Principal = request["principal"]
    if principal.consumer is not None:
        own = [lease for lease in access.leases() if lease.consumer == principal.consumer]
        return web.json_response({
            "status": "ok", "version": __version__,
            "uptime_secs": round(time.time() - server.started, 1),
            "consumer": principal.consumer, "leases": {"active": len(own)}})
    service = request.app[SERVICE]
    grants = access.state
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "pid": server.pid,
        "workers": server.workers,
        "worker_pid": os.getpid(),  # the one that answered
        "uptime_secs": round(time.time() - server.started, 1),
        "backend": service.backend,
        "listen": server.listen,
        "socket": str(service.home.socket),
        "service_manager": hardening.service_manager(),
        "config": request.app[CONFIG].as_json(),
        "grants": {"valid": grants.valid, "count": len(grants.grants), "error": grants.error,
                   "loaded_at": rfc3339(grants.loaded_at)},
        "leases": {"active": len(access.leases())},
        "requests": dict(server.requests),
        "teams": request.app[TEAMS].as_json(),
    })


async def create_lease(request: web.Request) -> web.Response:
    cache = request.app[SECRETS]
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
    version = cache.secret_version(ref)
    request.app[AUDIT].check_audit()
    lease = request.app[ACCESS].acquire(
        (consumer, ref, str(fields["purpose"]), str(fields["delivery"]), None), version)
    request["lease_id"] = lease.lease_id
    doc = lease_json(lease)
    doc["ttl_secs"] = round(lease.expires_at - lease.issued_at)
    if lease.delivery == "native":
        doc["value"] = cache.value(ref, version)
    return web.json_response(doc, status=201)


async def list_leases(request: web.Request) -> web.Response:
    principal: Principal = request["principal"]
    leases = [lease for lease in request.app[ACCESS].leases()
              if principal.consumer is None or lease.consumer == principal.consumer]
    return web.json_response({"leases": [lease_json(lease) for lease in leases]})


async def revoke_lease(request: web.Request) -> web.Response:
    access = request.app[ACCESS]
    principal: Principal = request["principal"]
    lease_id = request.match_info["lease_id"]
    lease = access.lease(lease_id)
    if lease is None or (principal.consumer is not None and lease.consumer != principal.consumer):
        raise NotFound(f"no active lease {lease_id}", code="lease_not_found")
    access.revoke(lease_id, "revoked by request")
    return web.json_response({"lease_id": lease_id, "revoked": True})


# --- what a consumer may see of its own access (the MCP server uses these) ----------------


async def my_grants(request: web.Request) -> web.Response:
    """The grants of the caller's consumer, with each secret's provider and kind."""
    consumer = request["consumer"] = consumer_of(request)
    metas = {m.ref: m for m in request.app[SERVICE].metadata.all()}
    rows = []
    mine = (g for g in request.app[ACCESS].state.grants if g.consumer == consumer)
    for row in grants_as_rows(mine):
        meta = metas.get(str(row["secret_ref"]))
        rows.append({**row, "provider": meta.provider if meta else None,
                     "kind": meta.kind if meta else None, "exists": meta is not None})
    return web.json_response({"consumer": consumer, "grants": rows})


async def my_explain(request: web.Request) -> web.Response:
    """Would the caller's consumer be allowed? Defaults: header injection to the secret's
    provider host, as a gateway call would ask."""
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
    meta = request.app[SERVICE].metadata.find(ref)
    if host is None and delivery == "http_header_inject" and meta is not None:
        provider = request.app[CONFIG].providers.get(meta.provider)
        host = provider.host if provider is not None else None
    decision = request.app[ACCESS].decide(AccessRequest(consumer, ref, body.get("purpose"),
                                                        delivery, host))
    return web.json_response(explain_as_json(decision))


async def mcp_tool_called(request: web.Request) -> web.Response:
    """The MCP server records each tool call here before making it (no audit, no action)."""
    audit = request.app[AUDIT]
    body = await json_body(request)
    consumer = request["consumer"] = consumer_of(request)
    if set(body) != {"tool"} or body["tool"] not in TOOLS:
        raise UsageError(f"send {{\"tool\"}} naming one of {', '.join(TOOLS)}")
    audit.check_audit()
    audit.record("mcp.tool_called", consumer=consumer, tool=body["tool"], outcome="called")
    return web.json_response({"consumer": consumer, "tool": body["tool"]}, status=201)


async def usage(request: web.Request) -> web.Response:
    """Usage; the owner sees every consumer, a consumer token only its own."""
    request.app[SPENDING].flush_usage(request.app[SERVICE].metadata)  # the last second's too
    principal: Principal = request["principal"]
    rows = Queries(request.app[ADMIN]).usage(since=request.query.get("since") or None,
                                    by=request.query.get("group_by") or None,
                                    consumer=principal.consumer)
    return web.json_response({"usage": [r.as_json() for r in rows]})

