"""Grant rules, access requests and decisions as frozen values.

Everything here is immutable so a loaded policy can be shared and swapped whole on
reload, and a decision can be audited exactly as it was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

DELIVERIES: frozenset[str] = frozenset({"native", "http_header_inject", "env"})
# The characters of a secret ref and a consumer name, for the whole project. It lives here
# because grants is the lowest layer; broker.core.refs builds its patterns from it.
REF_PATTERN = r"[A-Za-z0-9_.-]{1,128}"


@dataclass(frozen=True, slots=True)
class Grant:
    """One `[[grants]]` table, validated; `index` and `line` let the owner find it."""

    index: int  # 0-based position in the file
    line: int  # 1-based line of its `[[grants]]` header
    secret_ref: str  # normalised: no leading "@"
    consumer: str
    purposes: tuple[str, ...]
    delivery: tuple[str, ...]
    allowed_hosts: tuple[str, ...]  # lower-cased; "host" or "host:port"
    ttl_secs: int


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """What a consumer asks for; `decide()` judges it against the grants."""

    consumer: str
    secret_ref: str  # with or without "@"; decide() normalises
    purpose: str | None  # None is allowed only for delivery "env"
    delivery: str
    host: str | None  # upstream "host" or "host:port"; None = no upstream host


@dataclass(frozen=True, slots=True)
class Allow:
    """The request may proceed under `grant`, for at most `ttl_secs`."""

    allowed: ClassVar[Literal[True]] = True
    grant: Grant
    ttl_secs: int


@dataclass(frozen=True, slots=True)
class Deny:
    """The request is refused; `reason` tells the owner what to fix."""

    allowed: ClassVar[Literal[False]] = False
    reason: str


Decision = Allow | Deny


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a grants file, located as precisely as the text allows."""

    line: int | None  # 1-based
    index: int | None  # 0-based grant index, as in Grant.index
    key: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.index is not None:
            where.append(f"grant {self.index}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class GrantsError(Exception):
    """The grants file is invalid; .problems lists every problem at once."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        # Both go to Exception.args so the error survives pickling intact.
        super().__init__(source, tuple(problems))
        self.source = source
        self.problems: tuple[Problem, ...] = tuple(problems)

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'' if n == 1 else 's'}:"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


# What a lease is filed under: consumer, secret_ref, purpose, delivery, host
LeaseKey = tuple[str, str, str | None, str, str | None]


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
