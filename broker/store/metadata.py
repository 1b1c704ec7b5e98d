"""SQLite metadata: which refs exist, and everything about them except their values."""

from __future__ import annotations

import hmac
import os
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from broker.core.errors import SecretExists, SecretNotFound
from broker.gateway.usage import UsageRow

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
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    consumer TEXT NOT NULL,
    description TEXT,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT,
    revoked_at TEXT,
    daily_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    consumer TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,  -- '' when the request named none
    route TEXT NOT NULL,
    day TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cached_tokens INTEGER,
    reasoning_tokens INTEGER,
    PRIMARY KEY (consumer, provider, model, route, day)
);
CREATE TABLE IF NOT EXISTS token_usage (
    token_id TEXT NOT NULL,
    day TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (token_id, day)
);
"""
# `generation` moves only when secrets or tokens change (not on last-used touches, audit
# checkpoints or usage flushes), so the daemon reloads them only when it must.
_GENERATION_TRIGGERS = {
    "secret_added": "INSERT ON secrets",
    "secret_removed": "DELETE ON secrets",
    "secret_changed": "UPDATE OF version, fingerprint ON secrets",
    "token_added": "INSERT ON tokens",
    "token_removed": "DELETE ON tokens",
    "token_changed": "UPDATE OF revoked_at, expires_at, daily_tokens ON tokens",
}
_SCHEMA += "".join(
    f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {when} BEGIN UPDATE meta "  # noqa: S608
    "SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'; END;\n"
    for name, when in _GENERATION_TRIGGERS.items())  # S608: constant names, not input

# A team vault's rollback memory: what this home pinned and the newest state it verified.
_SCHEMA += """
CREATE TABLE IF NOT EXISTS team_trust (
    team TEXT PRIMARY KEY, team_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    commit_id TEXT, generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS team_seqs (
    team TEXT NOT NULL, ref TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (team, ref)
);
"""

_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
# NULL means "unknown": adding a known count to it starts from zero, adding NULL keeps it.
_UPSERT_USAGE = (
    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608 - constant names
    "ON CONFLICT (consumer, provider, model, route, day) DO UPDATE SET "
    "requests = requests + excluded.requests, errors = errors + excluded.errors, "
    + ", ".join(f"{f} = CASE WHEN excluded.{f} IS NULL THEN {f} "
                f"ELSE coalesce({f}, 0) + excluded.{f} END" for f in _TOKEN_FIELDS)
)


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


@dataclass(frozen=True)
class TokenMeta:
    """A consumer token's record; only the SHA-256 of the token itself is kept."""

    id: str
    hash: str
    consumer: str
    description: str | None
    created_at: str
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None
    daily_tokens: int | None

    def as_json(self) -> dict[str, object]:
        doc = asdict(self)
        del doc["hash"]
        return doc


def case_twin_message(ref: str, twin: str) -> str:
    return (f"@{ref} differs from @{twin} only in case; refs are compared without case "
            f"(a file vault on macOS or Windows could not keep both): use @{twin} or another "
            "name")


def read_instance_id(path: Path) -> str | None:
    """The instance id in another home's metadata.db, read-only; None if there is none."""
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class TeamTrust:
    team_id: str
    fingerprint: str  # SHA-256 of the genesis roster, pinned at init or join
    commit: str | None  # the newest commit verified here
    generation: int
    seqs: dict[str, int]


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
        if self.get_meta("generation") is None:  # not in _SCHEMA: opening must not write
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')")

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap "did anything change?"."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def bump_generation(self) -> None:
        """Tell a running daemon to re-read what it caches (a rotated bootstrap token)."""
        with self._db:
            self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                             "WHERE key = 'generation'")

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        self._db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def advance_checkpoint(self, seq: int, mac: str, seal: Callable[[int, str], str]) -> None:
        """Record the newest audit (seq, mac) and its seal, never moving backwards. A missing
        (past the first line), unsealed or wrongly sealed checkpoint is left as it is: it is
        the evidence `audit verify` reports, and only `audit verify --reseal` replaces it."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            current = self.checkpoint()
            if current is None:
                intact = seq == 1
            else:
                sealed = current[2]
                intact = sealed is not None and hmac.compare_digest(sealed, seal(*current[:2]))
            if intact and (current is None or current[0] < seq):
                self._set_checkpoint((seq, mac, seal(seq, mac)))

    def checkpoint(self) -> tuple[int, str, str | None] | None:
        """The newest audit (seq, mac) and its seal (None in a home from before sealing).

        One statement, so one snapshot: read key by key, a writer committing in between
        would pair an old seq with a new seal, which reads as an edited checkpoint."""
        rows = {str(key): str(value) for key, value in self._db.execute(
            "SELECT key, value FROM meta WHERE key IN ('audit_seq', 'audit_mac', 'audit_seal')")}
        seq, mac = rows.get("audit_seq"), rows.get("audit_mac")
        if seq is None or mac is None:
            return None
        # A hand-edited seq that is no number reads as 0, which its seal then fails.
        return int(seq) if seq.isdigit() else 0, mac, rows.get("audit_seal")

    def replace_checkpoint(self, checkpoint: tuple[int, str, str] | None) -> None:
        """`audit verify --reseal`: trust the log as it is now (None: an empty log)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if checkpoint is None:
                self._db.execute("DELETE FROM meta WHERE key IN "
                                 "('audit_seq', 'audit_mac', 'audit_seal')")
            else:
                self._set_checkpoint(checkpoint)

    def _set_checkpoint(self, checkpoint: tuple[int, str, str]) -> None:
        for name, value in zip(("audit_seq", "audit_mac", "audit_seal"), checkpoint,
                               strict=True):
            self.set_meta(name, str(value))

    def require_absent(self, ref: str) -> None:
        """Refuse `ref`, and a ref that differs from it only in case: a file vault on a
        case-insensitive file system (macOS, Windows) would keep both in one file."""
        if self.find(ref) is not None:
            raise SecretExists(
                f"@{ref} already exists; use `secret-broker rotate @{ref}` to replace its value"
            )
        twin = self.case_twin(ref)
        if twin is not None:
            raise SecretExists(case_twin_message(ref, twin))

    def case_twin(self, ref: str) -> str | None:
        """A stored ref equal to `ref` but for case (refs are ASCII, so NOCASE covers them)."""
        row = self._db.execute("SELECT ref FROM secrets WHERE ref = ? COLLATE NOCASE AND ref != ?",
                               (ref, ref)).fetchone()
        return None if row is None else str(row[0])

    def insert(self, meta: SecretMeta, *, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        try:
            self._db.execute(
                f"{verb} INTO secrets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    # --- consumer tokens ----------------------------------------------------------------

    def insert_token(self, token: TokenMeta) -> None:
        self._db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (token.id, token.hash, token.consumer, token.description,
                          token.created_at, token.expires_at, token.last_used_at,
                          token.revoked_at, token.daily_tokens))

    def tokens(self) -> list[TokenMeta]:
        rows = self._db.execute("SELECT * FROM tokens ORDER BY created_at, id")
        return [TokenMeta(*row) for row in rows]

    def revoke_tokens(self, when: str, *, token_id: str | None = None,
                      consumer: str | None = None) -> list[TokenMeta]:
        """Revoke one token or all of a consumer's; return those that were active."""
        column, value = ("id", token_id) if token_id is not None else ("consumer", consumer)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(
                f"SELECT * FROM tokens WHERE {column} = ? AND revoked_at IS NULL",  # noqa: S608
                (value,)).fetchall()
            self._db.execute(
                f"UPDATE tokens SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL",  # noqa: S608
                (when, value))
        return [TokenMeta(*row) for row in rows]

    def touch_token(self, token_id: str, when: str) -> None:
        self._db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (when, token_id))

    # --- usage --------------------------------------------------------------------------

    def add_usage(self, rows: list[UsageRow], spent: dict[tuple[str, str], int]) -> None:
        """Fold the daemon's in-memory rows (and per-token spend) into the tables."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_UPSERT_USAGE, [
                (r.consumer, r.provider, r.model or "", r.route, r.day, r.requests, r.errors,
                 r.input_tokens, r.output_tokens, r.cached_tokens, r.reasoning_tokens)
                for r in rows])
            self._db.executemany(
                "INSERT INTO token_usage VALUES (?, ?, ?) ON CONFLICT (token_id, day) "
                "DO UPDATE SET tokens = tokens + excluded.tokens",
                [(token_id, day, tokens) for (token_id, day), tokens in spent.items()])

    def usage(self, since_day: str | None = None, consumer: str | None = None) -> list[UsageRow]:
        query, args = "SELECT * FROM usage WHERE day >= ?", [since_day or ""]
        if consumer is not None:
            query += " AND consumer = ?"
            args.append(consumer)
        return [UsageRow(c, p, m or None, r, d, n, e, i, o, ca, re)
                for c, p, m, r, d, n, e, i, o, ca, re in self._db.execute(query, args)]

    def token_spend(self, day: str) -> dict[tuple[str, str], int]:
        rows = self._db.execute("SELECT token_id, day, tokens FROM token_usage WHERE day = ?",
                                (day,))
        return {(token_id, d): tokens for token_id, d, tokens in rows}

    # --- team vaults: pins and rollback memory -----------------------------------------

    def team_trust(self, team: str) -> TeamTrust | None:
        row = self._db.execute("SELECT team_id, fingerprint, commit_id, generation "
                               "FROM team_trust WHERE team = ?", (team,)).fetchone()
        if row is None:
            return None
        seqs = dict(self._db.execute("SELECT ref, seq FROM team_seqs WHERE team = ?", (team,)))
        return TeamTrust(row[0], row[1], row[2], row[3], seqs)

    def pin_team(self, team: str, team_id: str, fingerprint: str) -> None:
        """Trust this genesis for `team` from now on, with no history seen yet."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM team_seqs WHERE team = ?", (team,))
            self._db.execute("INSERT OR REPLACE INTO team_trust VALUES (?, ?, ?, NULL, 0)",
                             (team, team_id, fingerprint))

    def remember_team(self, team: str, commit: str, generation: int, seqs: dict[str, int], *,
                      reset: bool = False) -> None:
        """The newest verified commit; marks only grow, unless `reset` (trust-reset)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if reset:
                self._db.execute("DELETE FROM team_seqs WHERE team = ?", (team,))
                self._db.execute("UPDATE team_trust SET commit_id = ?, generation = ? "
                                 "WHERE team = ?", (commit, generation, team))
            else:
                self._db.execute("UPDATE team_trust SET commit_id = ?, generation = "
                                 "MAX(generation, ?) WHERE team = ?", (commit, generation, team))
            self._db.executemany(
                "INSERT INTO team_seqs VALUES (?, ?, ?) ON CONFLICT (team, ref) "
                "DO UPDATE SET seq = MAX(seq, excluded.seq)",
                [(team, ref, seq) for ref, seq in seqs.items()])
