"""Grants as JSON-ready rows, for `grants check --json` and the admin API (SPEC §11)."""

from __future__ import annotations

from collections.abc import Iterable

from grants.model import Grant


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
