"""Grants: who may use which secret, how, and for how long (SPEC §5).

Pure policy, no I/O beyond reading the grants file; never imports `broker`.
"""

from grants.leases import Lease, LeaseKey, LeaseTable, lease_key
from grants.loader import load_grants, parse_grants
from grants.model import (
    DELIVERIES,
    AccessRequest,
    Allow,
    Decision,
    Deny,
    Grant,
    GrantsError,
    Problem,
)
from grants.policy import decide
from grants.render import grants_as_rows

__all__ = [
    "DELIVERIES",
    "AccessRequest",
    "Allow",
    "Decision",
    "Deny",
    "Grant",
    "GrantsError",
    "Lease",
    "LeaseKey",
    "LeaseTable",
    "Problem",
    "decide",
    "grants_as_rows",
    "lease_key",
    "load_grants",
    "parse_grants",
]
