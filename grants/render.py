"""Grants as JSON-ready rows, for `grants check --json` and the admin API."""

from __future__ import annotations

from collections.abc import Iterable

from grants.model import Allow, Decision, Grant


def grants_as_rows(grants: Iterable[Grant]) -> list[dict[str, object]]:
    """One dict per grant in file order; lists, not tuples, so any JSON encoder takes them."""
    return [
        {
            "index": g.index,
            "line": g.line,
            "secret_ref": g.secret_ref,
            "consumer": g.consumer,
            "purposes": list(g.purposes),
            "delivery": list(g.delivery),
            "allowed_hosts": list(g.allowed_hosts),
            "ttl_secs": g.ttl_secs,
        }
        for g in grants
    ]


def explain_as_json(decision: Decision) -> dict[str, object]:
    """An explain answer: the decision, the grant that allowed it, and the reason."""
    if isinstance(decision, Allow):
        g = decision.grant
        return {"decision": "allow", "grant": {"index": g.index, "line": g.line},
                "reason": f"grant {g.index} (line {g.line}) allows it for {decision.ttl_secs} s"}
    return {"decision": "deny", "grant": None, "reason": decision.reason}
