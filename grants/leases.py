"""Leases: time-limited permissions issued under a grant.

Pure bookkeeping with the clock injected, so expiry is tested without sleeping. Not
thread-safe on purpose: the daemon calls it only from its event loop thread, and no
method awaits, so no lock is needed.
"""

from __future__ import annotations

import builtins
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from grants.model import AccessRequest, Allow, Deny, Grant
from grants.policy import decide

# consumer, secret_ref, purpose, delivery, host
LeaseKey = tuple[str, str, str | None, str, str | None]


def lease_key(request: AccessRequest) -> LeaseKey:
    """The reuse key for a request, normalised as leases store it."""
    return _normalised(
        (request.consumer, request.secret_ref, request.purpose, request.delivery, request.host)
    )


def _normalised(key: LeaseKey) -> LeaseKey:
    """Ref without "@" and host lower-cased, so equal requests share one key."""
    consumer, ref, purpose, delivery, host = key
    return (consumer, ref.removeprefix("@"), purpose, delivery, host and host.lower())


@dataclass(frozen=True, slots=True)
class Lease:
    """One issued lease; `secret_version` lets a rotation end leases of the old value."""

    lease_id: str
    consumer: str
    secret_ref: str
    purpose: str | None
    delivery: str
    host: str | None
    grant_index: int
    secret_version: int
    issued_at: float
    expires_at: float

    @property
    def key(self) -> LeaseKey:
        """The reuse key this lease is filed under."""
        return (self.consumer, self.secret_ref, self.purpose, self.delivery, self.host)


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

    def revoke_unallowed(self, grants: Sequence[Grant]) -> builtins.list[Lease]:
        """After a reload, end the leases the new grants would deny."""
        return self.revoke_where(unallowed(grants))

    def revoke_secret(
        self, secret_ref: str, keep_version: int | None = None
    ) -> builtins.list[Lease]:
        """On rotation or removal, end the secret's leases except those of `keep_version`."""
        return self.revoke_where(of_secret(secret_ref, keep_version))

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
