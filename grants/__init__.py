"""Grants: who may use which secret, how, and for how long.

Pure policy, no I/O beyond reading the grants file; never imports `broker`.

The names below load their module on first use: `broker.core.refs` needs only the ref
pattern in `grants.model`, and every CLI command (`exec` above all) imports that, so
importing the package must not also load the parser and the policy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grants.loader import load_grants, parse_grants
    from grants.model import (
        DELIVERIES,
        AccessRequest,
        Allow,
        Decision,
        Deny,
        Grant,
        GrantsError,
        Lease,
        LeaseKey,
        Problem,
    )
    from grants.policy import decide
    from grants.render import grants_as_rows

_HOME = {
    "load_grants": "loader", "parse_grants": "loader",
    "DELIVERIES": "model", "AccessRequest": "model", "Allow": "model", "Decision": "model",
    "Deny": "model", "Grant": "model", "GrantsError": "model", "Lease": "model",
    "LeaseKey": "model", "Problem": "model",
    "decide": "policy", "grants_as_rows": "render",
}

__all__ = [
    "DELIVERIES", "AccessRequest", "Allow", "Decision", "Deny", "Grant", "GrantsError", "Lease",
    "LeaseKey", "Problem", "decide", "grants_as_rows", "load_grants", "parse_grants",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'grants' has no attribute {name!r}")
    return getattr(importlib.import_module(f"grants.{_HOME[name]}"), name)
