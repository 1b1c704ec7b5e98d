"""SQLite metadata: which refs exist, and everything about them except their values."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.errors import SecretExists, SecretNotFound

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    ref TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    rotated_at TEXT,
    last_used_at TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class SecretMeta:
    ref: str
    provider: str
    kind: str
    backend: str
    fingerprint: str
    version: int
    created_at: str
    rotated_at: str | None
    last_used_at: str | None

    def as_json(self) -> dict[str, object]:
        return asdict(self)


class Metadata:
    """One connection per process; SQLite's own locking serialises concurrent writers."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        # autocommit mode; explicit BEGIN IMMEDIATE where a read decides a write.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap "did anything change?"."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def advance_checkpoint(self, seq: int, mac: str) -> None:
        """Record the newest audit (seq, mac), never moving backwards."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            current = self.get_meta("audit_seq")
            if current is None or int(current) < seq:
                self.set_meta("audit_seq", str(seq))
                self.set_meta("audit_mac", mac)

    def checkpoint(self) -> tuple[int, str] | None:
        seq, mac = self.get_meta("audit_seq"), self.get_meta("audit_mac")
        return None if seq is None or mac is None else (int(seq), mac)

    def require_absent(self, ref: str) -> None:
        if self.find(ref) is not None:
            raise SecretExists(
                f"@{ref} already exists; use `secret-broker rotate @{ref}` to replace its value"
            )

    def insert(self, meta: SecretMeta) -> None:
        try:
            self._db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (meta.ref, meta.provider, meta.kind, meta.backend, meta.fingerprint,
                 meta.version, meta.created_at, meta.rotated_at, meta.last_used_at),
            )
        except sqlite3.IntegrityError:
            self.require_absent(meta.ref)
            raise

    def find(self, ref: str) -> SecretMeta | None:
        row = self._db.execute("SELECT * FROM secrets WHERE ref = ?", (ref,)).fetchone()
        return None if row is None else SecretMeta(*row)

    def get(self, ref: str) -> SecretMeta:
        meta = self.find(ref)
        if meta is None:
            raise SecretNotFound(f"no secret @{ref}; see `secret-broker list`")
        return meta

    def all(self) -> list[SecretMeta]:
        return [SecretMeta(*row) for row in self._db.execute("SELECT * FROM secrets ORDER BY ref")]

    def set_value_info(self, ref: str, fingerprint: str, version: int, rotated_at: str) -> None:
        self._db.execute(
            "UPDATE secrets SET fingerprint = ?, version = ?, rotated_at = ? WHERE ref = ?",
            (fingerprint, version, rotated_at, ref),
        )

    def touch(self, ref: str, when: str) -> None:
        self._db.execute("UPDATE secrets SET last_used_at = ? WHERE ref = ?", (when, ref))

    def delete(self, ref: str) -> None:
        self._db.execute("DELETE FROM secrets WHERE ref = ?", (ref,))
