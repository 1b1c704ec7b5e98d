"""The daemon's access decisions: the loaded grants, the lease table, and their audit trail.

The lease table is pure bookkeeping on an injected clock (expiry is tested without
sleeping); `Access` is its adapter: it watches the grants file, shares leases with the
other workers, and audits. A warm request is one stat and one dictionary lookup here: the
policy (`grants.decide`) is asked only when no live lease fits.

Everything here runs on the event loop thread and never awaits between "is there an
active lease?" and "issue one", so racing first requests mint exactly one lease (the
decision and the table update are one synchronous step, as in httpcore's pool).
No audit, no lease: the decision is recorded before the lease is handed out.
"""

from __future__ import annotations

import builtins
import secrets
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from broker.core.errors import Denied
from broker.core.home import file_signature
from broker.server.shared import Ledger
from grants import (
    AccessRequest,
    Allow,
    Decision,
    Deny,
    Grant,
    GrantsError,
    Lease,
    LeaseKey,
    decide,
    load_grants,
)

log = structlog.get_logger("broker.server.access")
Record = Callable[..., None]


# --- the lease table (pure) ---------------------------------------------------------------


def lease_key(request: AccessRequest) -> LeaseKey:
    """The reuse key for a request, normalised as leases store it."""
    return _normalised(
        (request.consumer, request.secret_ref, request.purpose, request.delivery, request.host)
    )


def _normalised(key: LeaseKey) -> LeaseKey:
    """Ref without "@" and host lower-cased, so equal requests share one key."""
    consumer, ref, purpose, delivery, host = key
    return (consumer, ref.removeprefix("@"), purpose, delivery, host and host.lower())


class LeaseTable:
    """Live leases by id, plus an index by request key so repeat requests reuse one."""

    # `list` is a method here (the daemon's API), so later annotations say `builtins.list`.

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_id: dict[str, Lease] = {}  # insertion order is issue order: oldest first
        self._by_key: dict[LeaseKey, str] = {}  # every id here is also in _by_id

    def active(self, key: LeaseKey) -> Lease | None:
        """The live lease to reuse for `key`, if any."""
        lease_id = self._by_key.get(_normalised(key))
        return None if lease_id is None else self.get(lease_id)

    def issue(self, request: AccessRequest, allow: Allow, secret_version: int) -> Lease:
        """Record a new lease ending `allow.ttl_secs` from now; later reuse finds this one."""
        now = self._clock()
        consumer, ref, purpose, delivery, host = lease_key(request)
        lease = Lease(
            lease_id="lse_" + secrets.token_urlsafe(16),
            consumer=consumer,
            secret_ref=ref,
            purpose=purpose,
            delivery=delivery,
            host=host,
            grant_index=allow.grant.index,
            secret_version=secret_version,
            issued_at=now,
            expires_at=now + allow.ttl_secs,
        )
        self.adopt(lease)
        return lease

    def adopt(self, lease: Lease) -> None:
        """File a lease issued elsewhere (another worker), so later requests reuse it."""
        self._by_id[lease.lease_id] = lease
        self._by_key[lease.key] = lease.lease_id

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id while it is live; an expired one is dropped."""
        lease = self._by_id.get(lease_id)
        if lease is not None and self._clock() >= lease.expires_at:
            self._drop(lease)
            return None
        return lease

    def list(self) -> builtins.list[Lease]:
        """Live leases, oldest first."""
        self._prune()
        return list(self._by_id.values())

    def revoke(self, lease_id: str) -> Lease | None:
        """End one lease; returns it, or None when it was unknown or already expired."""
        lease = self.get(lease_id)
        if lease is not None:
            self._drop(lease)
        return lease

    def revoke_where(self, pred: Callable[[Lease], bool]) -> builtins.list[Lease]:
        """End every live lease `pred` selects; returns them, oldest first."""
        doomed = [lease for lease in self.list() if pred(lease)]
        for lease in doomed:
            self._drop(lease)
        return doomed

    def ids(self) -> Iterator[str]:
        """The ids filed (lazily: the daemon's workers read them only when another worker
        changed something)."""
        return iter(self._by_id)

    def __len__(self) -> int:
        self._prune()
        return len(self._by_id)

    def _prune(self) -> None:
        now = self._clock()
        for lease in [lease for lease in self._by_id.values() if now >= lease.expires_at]:
            self._drop(lease)

    def _drop(self, lease: Lease) -> None:
        del self._by_id[lease.lease_id]
        # A newer lease may have taken the key; leave its index entry alone.
        if self._by_key.get(lease.key) == lease.lease_id:
            del self._by_key[lease.key]


def unallowed(grants: Sequence[Grant]) -> Callable[[Lease], bool]:
    """Selects the leases that `grants` would deny (after a reload)."""
    return lambda lease: isinstance(decide(grants, AccessRequest(*lease.key)), Deny)


def of_secret(secret_ref: str, keep_version: int | None = None) -> Callable[[Lease], bool]:
    """Selects a secret's leases, except those of `keep_version` (after a rotation)."""
    ref = secret_ref.removeprefix("@")
    return lambda lease: lease.secret_ref == ref and lease.secret_version != keep_version


# --- the daemon's access ----------------------------------------------------------------


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

    def acquire(self, key: LeaseKey, secret_version: int, **audit: Any) -> Lease:
        """An active lease for this request, or a new one if a grant allows it."""
        self.reload_if_changed()  # before reusing a lease: its grant may just have gone
        if self.ledger is not None:  # another worker may have revoked one of ours
            for lease_id in self.ledger.revoked_since_last_look(self.table.ids()):
                self.table.revoke(lease_id)
        lease = self.table.active(key)
        if lease is not None and lease.secret_version == secret_version:
            return lease
        request = AccessRequest(*key)
        ref = request.secret_ref.lstrip("@")
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
