"""One authentication step: whatever a request presents becomes a Principal, or 401.

The bootstrap token is re-read when `broker.token` changes; `token rotate` also moves
metadata.db's generation, which every request checks, so the old token ends at once.
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.core.digest import token_hash
from broker.core.errors import Unauthorized
from broker.server.shared import WorkersDB


@dataclass(frozen=True)
class Principal:
    kind: str  # "owner": the bootstrap token or the Unix socket; "consumer"; "session"
    via: str  # "unix" | "tcp"
    consumer: str | None = None  # fixed by a consumer token; None = the caller may name one
    token_id: str | None = None
    daily_tokens: int | None = None  # the token's budget; the owner has none


def presented_token(headers: Mapping[str, str], places: Iterable[str]) -> str | None:
    """The broker token a caller sent, looked for in the headers its SDK uses."""
    for name in places:
        value = headers.get(name)
        if not value:
            continue
        if name.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            continue
        return value.strip()
    return None


@dataclass(frozen=True)
class ConsumerToken:
    token_id: str
    consumer: str
    expires_at: float | None
    revoked: bool
    daily_tokens: int | None = None


class Sessions(Protocol):
    """The dashboard's sessions (`broker.server.ui.Logins`), looked up by token hash."""

    def touch(self, digest: str) -> bool:
        """Is the session with this token hash live? Using it counts as activity."""
        ...


class Authenticator:
    """Maps a presented token to a Principal: the bootstrap token, a consumer token, or
    (on the dashboard's API only, and nothing else there) a dashboard session token.

    Consumer tokens are looked up by their SHA-256, so the table holds no token and a
    lookup reveals nothing an attacker could time; the bootstrap token is compared with
    `hmac.compare_digest`.
    """

    def __init__(self, token_path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = token_path
        self._clock = clock
        self._signature: tuple[int, int] | None = None
        self._token = b""
        self.consumer_tokens: Mapping[str, ConsumerToken] = {}
        self.sessions: Sessions | None = None
        self.reread()

    def reread(self) -> None:
        """Re-read `broker.token` if it changed (inode, mtime). Not on every request: when
        metadata.db changed (`token rotate` moves its generation) and once a second (an edit
        by hand)."""
        try:
            st = os.stat(self._path)
            signature = (st.st_ino, st.st_mtime_ns)
            if signature != self._signature:
                self._token = self._path.read_bytes().strip()
                self._signature = signature
        except FileNotFoundError:
            self._token, self._signature = b"", None

    def broker_tokens(self, presented: str | None) -> tuple[str, ...]:
        """The broker tokens in play for one request, which the gateway must not forward in
        any header or query parameter: the caller's own token and the owner's bootstrap token."""
        own = self._token.decode("utf-8", "surrogateescape")
        return tuple(t for t in (own, presented) if t)

    def authenticate(self, presented: str | None, via: str, *,
                     dashboard: bool = False) -> Principal:
        """`dashboard`: the request is for /ui/api/, where the owner's way in is a session
        (a consumer token still authenticates there, to be refused as `owner_only`)."""
        expected = self._token
        if presented is None:
            if via == "unix" and not dashboard:  # the socket's 0600 mode in a 0700 directory
                return Principal("owner", via)
            raise Unauthorized("missing broker token: send Authorization: Bearer <token>")
        # Header bytes that are not UTF-8 arrive as surrogates: compare them, never crash.
        raw = presented.encode("utf-8", "surrogateescape")
        if expected and hmac.compare_digest(raw, expected):
            if dashboard:
                raise Unauthorized("the dashboard's API takes a session token: open it with "
                                   "`secret-broker ui`")
            return Principal("owner", via)
        digest = token_hash(raw)
        if dashboard and self.sessions is not None and self.sessions.touch(digest):
            return Principal("session", via)
        known = self.consumer_tokens.get(digest)
        if known is None:
            raise Unauthorized("invalid broker token")
        if known.revoked:
            raise Unauthorized("this consumer token was revoked", token_id=known.token_id)
        if known.expires_at is not None and self._clock() >= known.expires_at:
            raise Unauthorized("this consumer token has expired", token_id=known.token_id)
        return Principal("consumer", via, known.consumer, known.token_id, known.daily_tokens)


class FailureThrottle:
    """Slows a peer that keeps presenting bad tokens; a valid token is never delayed.

    Each failure within `window` seconds past the first `free` doubles the delay before
    the 401 is sent (capped), so guessing gets slow while the owner is never locked out.
    """

    def __init__(self, free: int = 5, window: float = 60.0, cap: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._free, self._window, self._cap, self._clock = free, window, cap, clock
        self._failures: dict[str, tuple[int, float]] = {}

    def penalty(self, peer: str) -> float:
        """Record a failure from `peer`; return how long to wait before answering."""
        now = self._clock()
        count, since = self._failures.get(peer, (0, now))
        if now - since > self._window:
            count, since = 0, now
        if len(self._failures) > 10_000:  # bounded memory under a flood of peers
            self._failures.clear()
        self._failures[peer] = (count + 1, since)
        return self._delay(count + 1)

    def _delay(self, failures: int) -> float:
        excess = failures - self._free
        # Bound the exponent, not just the result: 0.01 * 2 ** 1100 overflows a float.
        return 0.0 if excess <= 0 else min(self._cap, 0.01 * 2.0 ** min(excess - 1, 64))


class SharedThrottle(FailureThrottle):
    """`FailureThrottle` for several workers, in run/workers.db: a guesser's failures count
    the same whichever worker answers them (CLOCK_MONOTONIC is one clock for all)."""

    def __init__(self, db: WorkersDB) -> None:
        super().__init__()
        self._db = db

    def penalty(self, peer: str) -> float:
        now = self._clock()
        with self._db.transaction() as c:
            c.execute("DELETE FROM failures WHERE ? - since > ?", (now, self._window))
            row = c.execute("SELECT count FROM failures WHERE peer = ?", (peer,)).fetchone()
            count = 0 if row is None else int(row[0])
            c.execute("INSERT INTO failures VALUES (?, 1, ?) ON CONFLICT (peer) "
                      "DO UPDATE SET count = count + 1", (peer, now))
        return self._delay(count + 1)


@dataclass
class _Window:
    opened: float
    fields: dict[str, Any]  # the first refusal's, as written at once
    more: int = 0  # refusals after the first, still to be written as one line
    delay: float = 0.0  # the longest slow-down imposed in the window


class RefusalTally:
    """Keeps a flood of refusals from filling the disk: the first refusal of a
    (event, reason, peer bucket, token id) is written at once, the rest of its `window` are
    counted and written as one line with `count` when the window closes.

    Keys are bounded: peers that share a throttle bucket share a key, and past `max_keys`
    open windows new peers share one (`peer` "other").
    """

    def __init__(self, window: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window, self._max_keys, self._clock = window, max_keys, clock
        self._open: dict[tuple[str | None, ...], _Window] = {}

    def first(self, event: str, bucket: str, fields: dict[str, Any], delay: float) -> bool:
        """Count one refusal; True when it opens a window and must be written now."""
        key = (event, fields.get("reason"), bucket, fields.get("token_id"))
        if key not in self._open and len(self._open) >= self._max_keys:
            key, fields = (event, fields.get("reason"), "other", None), {
                **fields, "peer": "other", "token_id": None}
        window = self._open.get(key)
        if window is None:
            self._open[key] = _Window(self._clock(), fields, delay=delay)
            return True
        window.more += 1
        window.delay = max(window.delay, delay)
        return False

    def closed(self, *, everything: bool = False) -> list[tuple[str, dict[str, Any], float]]:
        """Windows that ended (all of them with `everything`, at shutdown) and counted more
        refusals: (event, fields with `count`, longest delay). Their keys start afresh."""
        now = self._clock()
        done = [k for k, w in self._open.items() if everything or now - w.opened >= self._window]
        out = []
        for key in done:
            window = self._open.pop(key)
            if window.more:
                fields = {k: window.fields.get(k) for k in ("reason", "peer", "status",
                                                            "token_id")}
                out.append((str(key[0]), {**fields, "count": window.more}, window.delay))
        return out
