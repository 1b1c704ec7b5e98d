"""What several workers (`serve --workers N`) share, so that they behave as one broker.

Each worker is a forked process with its own event loop; the state that must agree across
them lives in one SQLite file, `run/workers.db`, which the supervisor creates empty at each
start (a restart ends every lease, as with one worker):

- the lease ledger: a lease issued by one worker is reused by the others, listed and
  revoked through any of them (`Ledger`);
- the consumer tokens' daily budgets: reserve, then settle, in one transaction each, so
  concurrent requests on different workers cannot race past a budget (`SharedBudgets`);
- the dashboard's login codes and sessions (`ui.SharedLogins`);
- the bad-token slow-down (`auth.SharedThrottle`).

Everything else is shared already: tokens and secrets through metadata.db (checked on
every request), the grants file (a stat per decision), the audit log (an flock'ed chain).
With one worker none of this is used: the same objects live in memory (`LeaseTable`,
`Budgets`, `Logins`).

The file holds hashes, ids and counts, never a token or a value. Writes skip fsync
(`synchronous=OFF`): the file is thrown away at the next start anyway.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from broker.core.home import open_private
from broker.gateway.usage import Reservation
from grants import Lease

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY, consumer TEXT NOT NULL, secret_ref TEXT NOT NULL,
    purpose TEXT, delivery TEXT NOT NULL, host TEXT, grant_index INTEGER NOT NULL,
    secret_version INTEGER NOT NULL, issued_at REAL NOT NULL, expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS leases_by_key ON leases (consumer, secret_ref, delivery);
CREATE TABLE IF NOT EXISTS spend (
    token_id TEXT NOT NULL, day TEXT NOT NULL, settled INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (token_id, day)
);
CREATE TABLE IF NOT EXISTS failures (
    peer TEXT PRIMARY KEY, count INTEGER NOT NULL, since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS codes (digest TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    digest TEXT PRIMARY KEY, started REAL NOT NULL, last_used REAL NOT NULL
);
"""
_LEASE_COLUMNS = ("lease_id, consumer, secret_ref, purpose, delivery, host, grant_index, "
                  "secret_version, issued_at, expires_at")


class WorkersDB:
    """One connection per worker to run/workers.db (opened after the fork)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(_SCHEMA)

    @classmethod
    def create(cls, path: Path, spend: dict[tuple[str, str], int]) -> None:
        """The supervisor's fresh, empty file (0600), seeded with today's settled spend."""
        cls.remove(path)
        os.close(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        db = cls(path)
        with db.transaction() as c:
            c.executemany("INSERT INTO spend (token_id, day, settled) VALUES (?, ?, ?)",
                          [(t, d, n) for (t, d), n in spend.items()])
        db.close()

    @staticmethod
    def remove(path: Path) -> None:
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            path.with_name(name).unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()

    def query(self, sql: str, args: Iterable[object] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, tuple(args))

    def data_version(self) -> int:
        """Moves when another worker committed: a cheap "did anything change?"."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: a read in it decides its write, with no other worker between."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _lease(row: tuple[object, ...]) -> Lease:
    return Lease(*row)  # type: ignore[arg-type]  # the columns, in Lease's field order


class Ledger:
    """The leases of every worker. A worker keeps its own `LeaseTable` for the warm path and
    asks the ledger on a miss, so racing first requests on several workers mint one lease."""

    def __init__(self, db: WorkersDB, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._seen = -1

    def claim(self, lease: Lease) -> Lease:
        """File `lease`, unless a live one for its key and secret version is filed already:
        then that one is returned, and `lease` is not filed."""
        with self._db.transaction() as c:
            c.execute("DELETE FROM leases WHERE expires_at < ?", (self._clock() - 3600,))
            found = c.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE consumer = ? AND secret_ref = ? "  # noqa: S608
                "AND purpose IS ? AND delivery = ? AND host IS ? AND secret_version = ? "
                "AND revoked = 0 AND expires_at > ? ORDER BY issued_at DESC LIMIT 1",
                (*lease.key, lease.secret_version, self._clock())).fetchone()
            if found is not None:
                return _lease(found)
            c.execute(f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES "  # noqa: S608
                      "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (lease.lease_id, *lease.key, lease.grant_index, lease.secret_version,
                       lease.issued_at, lease.expires_at))
        return lease

    def revoke(self, lease_ids: Iterable[str]) -> set[str]:
        """Mark leases revoked; returns those that were live (so each revocation is audited
        once, by the worker that made it)."""
        ids = list(lease_ids)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        with self._db.transaction() as c:
            live = {row[0] for row in c.execute(
                f"SELECT lease_id FROM leases WHERE revoked = 0 AND lease_id IN ({marks})",  # noqa: S608
                ids)}
            c.execute(f"UPDATE leases SET revoked = 1 WHERE lease_id IN ({marks})", ids)  # noqa: S608
        return live

    def revoked_since_last_look(self, lease_ids: Iterable[str]) -> list[str]:
        """Which of these (a worker's own) leases another worker revoked; asked on every
        decision, and one `PRAGMA data_version` when nothing changed."""
        version = self._db.data_version()
        if version == self._seen:
            return []
        self._seen = version
        ids = list(lease_ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return [row[0] for row in self._db.query(
            f"SELECT lease_id FROM leases WHERE revoked = 1 AND lease_id IN ({marks})", ids)]  # noqa: S608

    def live(self) -> list[Lease]:
        """Every worker's live leases, oldest first."""
        return [_lease(row) for row in self._db.query(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE revoked = 0 AND expires_at > ? "  # noqa: S608
            "ORDER BY issued_at", (self._clock(),))]

    def get(self, lease_id: str) -> Lease | None:
        row = self._db.query(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id = ? AND revoked = 0 "  # noqa: S608
            "AND expires_at > ?", (lease_id, self._clock())).fetchone()
        return None if row is None else _lease(row)


class SharedBudgets:
    """`Budgets` across workers: the check and the hold are one transaction."""

    def __init__(self, db: WorkersDB) -> None:
        self._db = db
        self.unflushed: dict[tuple[str, str], int] = {}  # this worker's, for metadata.db

    def reserve(self, token_id: str, day: str, limit: int, estimate: int) -> Reservation | None:
        estimate = max(0, estimate)
        with self._db.transaction() as c:
            row = c.execute("SELECT settled + held FROM spend WHERE token_id = ? AND day = ?",
                            (token_id, day)).fetchone()
            if (0 if row is None else int(row[0])) + estimate > limit:
                return None
            c.execute("INSERT INTO spend (token_id, day, held) VALUES (?, ?, ?) ON CONFLICT "
                      "(token_id, day) DO UPDATE SET held = held + excluded.held",
                      (token_id, day, estimate))
        return Reservation(token_id, day, estimate)

    def settle(self, reservation: Reservation, actual: int) -> None:
        actual = max(0, actual)
        with self._db.transaction() as c:
            c.execute("UPDATE spend SET held = held - ?, settled = settled + ? "
                      "WHERE token_id = ? AND day = ?",
                      (reservation.estimate, actual, reservation.token_id, reservation.day))
        key = (reservation.token_id, reservation.day)
        self.unflushed[key] = self.unflushed.get(key, 0) + actual

    def drain(self) -> dict[tuple[str, str], int]:
        spent, self.unflushed = self.unflushed, {}
        return spent
