"""The daemon's access decisions: the loaded grants, the lease table, and their audit trail.

Everything here runs on the event loop thread and never awaits between "is there an
active lease?" and "issue one", so racing first requests mint exactly one lease (the
decision and the table update are one synchronous step, as in httpcore's pool).
No audit, no lease: the decision is recorded before the lease is handed out.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from broker.core.errors import Denied
from broker.core.home import file_signature
from broker.server.shared import Ledger
from grants import (
    AccessRequest,
    Decision,
    Deny,
    GrantsError,
    Lease,
    LeaseTable,
    decide,
    load_grants,
)
from grants.leases import of_secret, unallowed
from grants.model import Grant

log = structlog.get_logger("broker.server.access")
Record = Callable[..., None]


@dataclass(frozen=True)
class GrantsState:
    grants: tuple[Grant, ...]
    valid: bool
    error: str | None
    loaded_at: float


class Access:
    def __init__(self, grants_path: Path, record: Record,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = grants_path
        self._record = record
        self.table = LeaseTable(clock)
        self.ledger: Ledger | None = None  # with several workers: their leases, shared
        self.state = GrantsState((), False, "not loaded yet", 0.0)
        self._signature: tuple[int, int, int] | None = None

    # --- the grants file --------------------------------------------------------------------

    def reload(self, why: str) -> None:
        """Load the grants file; an invalid one denies everything until it is fixed."""
        self._signature = file_signature(self._path)
        try:
            grants = load_grants(self._path)
        except GrantsError as exc:
            self.state = GrantsState((), False, str(exc), time.time())
            revoked = self._revoke_where(lambda _lease: True)
            log.error("grants.invalid", file=str(self._path), error=str(exc), why=why)
            self._safe_record("grants.invalid", reason=f"{exc}"[:2000], count=len(revoked))
            self._record_revoked(revoked, "grants file invalid")
            return
        self.state = GrantsState(grants, True, None, time.time())
        revoked = self._revoke_where(unallowed(grants))
        log.info("grants.reloaded", file=str(self._path), count=len(grants), why=why)
        self._safe_record("grants.reloaded", count=len(grants), reason=why)
        self._record_revoked(revoked, "grant removed")

    def reload_if_changed(self) -> None:
        """Reload when the file's inode, size or mtime changed: one stat, cheap enough for
        every decision, so an edit that removes a grant denies the very next request."""
        if file_signature(self._path) != self._signature:
            self.reload("file changed")

    def _safe_record(self, event: str, **fields: Any) -> None:
        """Record an event that follows a change already made (revocation must not wait)."""
        try:
            self._record(event, **fields)
        except Exception as exc:
            log.error("audit.failed", audit_event=event, error=type(exc).__name__)

    def _revoke_where(self, pred: Callable[[Lease], bool]) -> list[Lease]:
        """End the leases `pred` selects: this worker's, and (with several workers) the
        others' too, so a listing through any worker is right at once."""
        revoked = self.table.revoke_where(pred)
        if self.ledger is not None:
            ours = {lease.lease_id for lease in revoked}
            revoked += [lease for lease in self.ledger.live()
                        if pred(lease) and lease.lease_id not in ours]
        return revoked

    def _record_revoked(self, leases: list[Lease], reason: str) -> None:
        if self.ledger is not None:  # each revocation is audited once, by one worker
            live = self.ledger.revoke(lease.lease_id for lease in leases)
            leases = [lease for lease in leases if lease.lease_id in live]
        for lease in leases:
            self._safe_record("lease.revoked", lease_id=lease.lease_id, consumer=lease.consumer,
                              secret_ref=lease.secret_ref, reason=reason)

    # --- leases -----------------------------------------------------------------------------

    def decide(self, request: AccessRequest) -> Decision:
        """The current policy's answer, without a lease or an audit record (for explain)."""
        self.reload_if_changed()
        return self._policy(request)

    def _policy(self, request: AccessRequest) -> Decision:
        if not self.state.valid:
            return Deny("the grants file is invalid, so everything is denied until it is "
                        f"fixed: {self.state.error}")
        return decide(self.state.grants, request)

    def acquire(self, request: AccessRequest, secret_version: int, **audit: Any) -> Lease:
        """An active lease for this request, or a new one if a grant allows it."""
        self.reload_if_changed()  # before reusing a lease: its grant may just have gone
        if self.ledger is not None:  # another worker may have revoked one of ours
            for lease_id in self.ledger.revoked_since_last_look(self.table.ids()):
                self.table.revoke(lease_id)
        ref = request.secret_ref.lstrip("@")
        key = (request.consumer, ref, request.purpose, request.delivery, request.host)
        lease = self.table.active(key)
        if lease is not None and lease.secret_version == secret_version:
            return lease
        decision = self._policy(request)
        fields = dict(consumer=request.consumer, secret_ref=ref, purpose=request.purpose,
                      delivery=request.delivery, host=request.host, **audit)
        if isinstance(decision, Deny):
            self._record("lease.denied", reason=decision.reason, **fields)
            raise Denied(f"{decision.reason}; grants are in {self._path}, and "
                         f"`{_explain_command(request)}` shows what a grant needs")
        lease = self.table.issue(request, decision, secret_version)
        if self.ledger is not None:
            filed = self.ledger.claim(lease)
            if filed is not lease:  # another worker's, issued a moment ago: reuse it
                self.table.revoke(lease.lease_id)
                self.table.adopt(filed)
                return filed
        try:
            self._record("lease.issued", lease_id=lease.lease_id, **fields)
        except Exception:
            self.table.revoke(lease.lease_id)
            if self.ledger is not None:
                self.ledger.revoke([lease.lease_id])
            raise
        return lease

    def leases(self) -> list[Lease]:
        """Live leases, oldest first: every worker's."""
        return self.table.list() if self.ledger is None else self.ledger.live()

    def lease(self, lease_id: str) -> Lease | None:
        return self.table.get(lease_id) if self.ledger is None else self.ledger.get(lease_id)

    def revoke(self, lease_id: str, reason: str) -> Lease | None:
        lease = self.lease(lease_id)
        if lease is not None:
            self.table.revoke(lease_id)
            self._record_revoked([lease], reason)
        return lease

    def consumer_ended(self, consumer: str, reason: str) -> None:
        self._record_revoked(self._revoke_where(lambda lease: lease.consumer == consumer),
                             reason)

    def secret_changed(self, ref: str, version: int | None) -> None:
        """A rotation (keep `version`'s leases) or a removal (version None) ends old leases."""
        revoked = self._revoke_where(of_secret(ref, keep_version=version))
        self._record_revoked(revoked, "secret rotated" if version else "secret removed")


def _explain_command(request: AccessRequest) -> str:
    """The `grants explain` command line that asks the owner's question for this request."""
    words = ["secret-broker", "grants", "explain", "--consumer", request.consumer,
             "--secret", "@" + request.secret_ref.lstrip("@"), "--delivery", request.delivery]
    for flag, value in (("--purpose", request.purpose), ("--host", request.host)):
        if value is not None:
            words += [flag, value]
    return shlex.join(words)
