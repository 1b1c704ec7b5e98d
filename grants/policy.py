"""decide(grants, request) -> Allow | Deny: deny by default.

Pure and total: it never raises, so a caller can audit every decision before acting on
it. A denial names the first part of the request that no grant covers, judged against
the grants for that secret and consumer, so `grants explain` can say what to add.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from grants.model import DELIVERIES, AccessRequest, Allow, Decision, Deny, Grant


def decide(grants: Sequence[Grant], request: AccessRequest) -> Decision:
    """Allow under the first grant matching secret, consumer, purpose, delivery and host."""
    ref = request.secret_ref.removeprefix("@")
    consumer, delivery = request.consumer, request.delivery
    env = delivery == "env"  # env grants match on secret, consumer and delivery only
    if delivery not in DELIVERIES:
        return Deny(f"unknown delivery {delivery!r} (expected {', '.join(sorted(DELIVERIES))})")
    if request.purpose is None and not env:
        return Deny(f"delivery {delivery!r} needs a purpose; the request names none")

    candidates = [g for g in grants if g.secret_ref == ref]
    if not candidates:
        return Deny(f"no grant for secret {ref!r} (asked: {_asked(request)})")
    candidates = [g for g in candidates if g.consumer == consumer]
    if not candidates:
        return Deny(f"no grant gives consumer {consumer!r} secret {ref!r}")
    # Each stage narrows the grants; the first stage left empty is the part to fix.
    gives = f"consumer {consumer!r}"
    if not env:
        gives += f" purpose {request.purpose!r}"
        matching = [g for g in candidates if request.purpose in g.purposes]
        if not matching:
            return Deny(_reason(gives, ref, candidates[0], "purposes"))
        candidates = matching
    gives += f" delivery {delivery!r}"
    matching = [g for g in candidates if delivery in g.delivery]
    if not matching:
        return Deny(_reason(gives, ref, candidates[0], "delivery"))
    candidates = matching
    # host None means no upstream is involved (native, or a `POST /v1/leases` record); the
    # proxy always passes the host it will send the key to, and its leases are keyed by it.
    if request.host is not None and not env:
        host = request.host.lower()  # a bare "host" entry never equals "host:port", by design
        matching = [g for g in candidates if host in g.allowed_hosts]
        if not matching:
            return Deny(_reason(f"{gives} to host {host!r}", ref, candidates[0], "allowed_hosts"))
        candidates = matching
    return Allow(grant=candidates[0], ttl_secs=candidates[0].ttl_secs)


def _reason(gives: str, ref: str, nearest: Grant, key: str) -> str:
    """Name what is missing and the closest grant, so the owner knows which line to edit."""
    have = json.dumps(list(getattr(nearest, key)))
    return (
        f"no grant gives {gives} on secret {ref!r}; "
        f"grant {nearest.index} (line {nearest.line}) has {key} = {have}"
    )


def _asked(request: AccessRequest) -> str:
    """The request in the words of the other denials, so the owner knows what to grant."""
    parts = [f"consumer {request.consumer!r}"]
    if request.delivery != "env":
        parts.append(f"purpose {request.purpose!r}")
    parts.append(f"delivery {request.delivery!r}")
    if request.host is not None and request.delivery != "env":
        parts.append(f"host {request.host.lower()!r}")
    return ", ".join(parts)
