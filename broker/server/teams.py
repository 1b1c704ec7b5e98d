"""The team vaults the daemon serves: one verified commit per team, swapped in whole.

The daemon never fetches and never writes a repository. A stat of the git refs in the
housekeeping tick (and SIGHUP, and `team pull` through the admin route) notices a new
commit; it is read and verified in a thread of its own, with the verification every
command uses, then swapped in at once. A commit that fails verification (or a rollback)
makes that team's refs answer 503 naming the file and the rule, audited once per distinct
failure; a transient git error (a lock file during a pull) keeps the last verified commit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from broker.config import TeamConfig
from broker.core.errors import BrokerError, GitFailed, SecretNotFound, SecretUnavailable
from broker.core.home import Home
from broker.service.team import Teams, failure_event, read_commit, remember_commit
from broker.store.metadata import Metadata
from broker.team import edit
from broker.team.format import FormatError
from broker.team.keys import BadKey, Identity
from broker.team.verify import Broken, Verified

log = structlog.get_logger("broker.server.teams")
Record = Callable[..., None]


@dataclass(frozen=True)
class Snapshot:
    """What one team serves now: a verified commit, or why it serves nothing."""
    config: TeamConfig
    commit: str | None = None
    team: Verified | None = None
    failure: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"team": self.config.name, "path": self.config.path, "commit": self.commit,
                "secrets": len(self.team.secrets) if self.team else 0,
                "serving": self.team is not None, "failure": self.failure}


class ServedTeams:
    """Every configured team's snapshot, and the values read from them (memory only)."""

    def __init__(self, home: Home, teams: Teams, secret_changed: Callable[[str, int | None], None],
                 record: Record) -> None:
        self._home = home
        self._teams = teams  # the daemon's own context: the identity, read on the loop
        self._secret_changed = secret_changed
        self._record = record  # after the fact: a failed write is logged, never raised
        self._configs: dict[str, TeamConfig] = {}
        # Served refs start with one of these: a plain attribute, so a request for a local
        # ref never calls into this module.
        self.prefixes: tuple[str, ...] = ()
        self._snapshots: dict[str, Snapshot] = {}
        self._signatures: dict[str, object] = {}
        self._values: dict[str, tuple[int, str]] = {}  # served ref -> (version, value)
        self._failures_seen: set[tuple[str, str | None, str]] = set()
        self._identity: Identity | None = None
        # One thread reads and verifies, with its own SQLite connection (connections are
        # per thread); the event loop only swaps finished snapshots in.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teams")
        self._metadata: Metadata | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Future[None]] = set()

    # --- what requests ask -----------------------------------------------------------------

    def configure(self, teams: Mapping[str, TeamConfig]) -> None:
        """The teams config.toml names now; a team no longer named stops being served."""
        for name in set(self._snapshots) - set(teams):
            old = self._snapshots.pop(name)
            self._end(old, None)
        self._configs = dict(teams)
        self.prefixes = tuple(t.ref_prefix for t in teams.values())
        self._signatures = {n: s for n, s in self._signatures.items() if n in teams}

    def owner(self, ref: str) -> TeamConfig | None:
        return next((t for t in self._configs.values() if ref.startswith(t.ref_prefix)), None)

    def version(self, ref: str) -> int:
        config = self.owner(ref)
        assert config is not None
        snapshot = self._snapshots.get(config.name)
        if snapshot is None or snapshot.team is None:
            why = snapshot.failure if snapshot else "not loaded yet"
            raise SecretUnavailable(f"@{ref} is unavailable: team {config.name} is not served",
                                    detail=why)
        secret = snapshot.team.secrets.get(ref[len(config.ref_prefix):])
        if secret is None:
            raise SecretNotFound(f"team {config.name} has no secret @{ref[len(config.ref_prefix):]}"
                                 f" (as of commit {(snapshot.commit or '')[:12]})")
        return secret.envelope.version

    def value(self, ref: str, version: int) -> str:
        cached = self._values.get(ref)
        if cached is not None and cached[0] == version:
            return cached[1]
        config = self.owner(ref)
        assert config is not None
        snapshot = self._snapshots[config.name]
        assert snapshot.team is not None
        if self._identity is None:
            self._identity = self._teams.identity()
        if self._identity is None:
            raise SecretUnavailable("this home has no team identity (run `secret-broker team "
                                    "join`)")
        try:
            value = edit.value_of(snapshot.team, ref[len(config.ref_prefix):], self._identity)
        except (BadKey, FormatError):
            raise SecretUnavailable(f"@{ref} cannot be decrypted with this home's identity: "
                                    "this member is not one of its recipients") from None
        self._values[ref] = (version, value)
        return value

    def refs_for(self, provider: str) -> list[str]:
        """Served refs whose envelope names this provider."""
        return [s.config.ref_prefix + ref for s in self._snapshots.values() if s.team
                for ref, secret in s.team.secrets.items() if secret.envelope.provider == provider]

    def served(self) -> dict[str, tuple[int, str]]:
        """Served ref -> (version, provider), for the clash check and listings."""
        return {s.config.ref_prefix + ref: (secret.envelope.version, secret.envelope.provider)
                for s in self._snapshots.values() if s.team
                for ref, secret in s.team.secrets.items()}

    def secrets_json(self) -> list[dict[str, Any]]:
        """Served secrets in the admin API's secret shape, marked read-only."""
        out = []
        for snapshot in self._snapshots.values():
            if snapshot.team is None or snapshot.commit is None:
                continue
            for ref, secret in sorted(snapshot.team.secrets.items()):
                env = secret.envelope
                out.append({"ref": snapshot.config.ref_prefix + ref, "provider": env.provider,
                            "kind": env.kind, "backend": f"team:{snapshot.config.name}",
                            "fingerprint": f"commit {snapshot.commit[:12]}",
                            "version": env.version, "created_at": env.written_at,
                            "rotated_at": None, "last_used_at": None, "read_only": True})
        return out

    def as_json(self) -> list[dict[str, Any]]:
        return [self._snapshots.get(n, Snapshot(c, failure="not loaded yet")).as_json()
                for n, c in sorted(self._configs.items())]

    # --- following the repositories -----------------------------------------------------

    def refresh_soon(self) -> None:
        """A forced refresh from a synchronous caller (the SIGHUP handler)."""
        task = asyncio.ensure_future(self.refresh(force=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh(self, *, force: bool = False) -> None:
        """Load every team whose git refs changed (every team with `force`)."""
        async with self._lock:  # the tick, SIGHUP and `team pull` never interleave swaps
            await self._refresh(force)

    async def _refresh(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        for name, config in list(self._configs.items()):
            signature = await loop.run_in_executor(self._executor, _refs_signature, config)
            if not force and signature == self._signatures.get(name):
                continue
            self._signatures[name] = signature
            commit, result = await loop.run_in_executor(self._executor, self._read, config)
            if result is None:  # transient: keep what is served, look again next tick
                self._signatures.pop(name, None)
                continue
            if self._configs.get(name) == config:  # not reconfigured meanwhile
                self._swap(config, commit, result)

    def _read(self, config: TeamConfig) -> tuple[str | None, Verified | Broken | str | None]:
        """In the team thread: the commit and its verification, or a failure sentence, or
        None for a transient git error."""
        if self._metadata is None:
            self._metadata = Metadata(self._home.metadata)
        untrusted = _untrusted_checkout(Path(config.path))
        if untrusted is not None:
            return None, untrusted
        try:
            _repo, commit, result = read_commit(self._metadata, config)
        except GitFailed as exc:
            return None, None if exc.transient else exc.message
        except BrokerError as exc:
            return None, exc.message
        if isinstance(result, Verified):
            remember_commit(self._metadata, config.name, commit, result)
        return commit, result

    def _swap(self, config: TeamConfig, commit: str | None,
              result: Verified | Broken | str) -> None:
        old = self._snapshots.get(config.name)
        if not isinstance(result, Verified):
            message = result if isinstance(result, str) else result.message
            rule = None if isinstance(result, str) else result.rule
            self._snapshots[config.name] = Snapshot(config, commit, None, message)
            if old is not None:
                self._end(old, None)
            key = (config.name, commit, message)
            if key not in self._failures_seen:  # once per distinct failure
                self._failures_seen.add(key)
                log.error("team.unavailable", team=config.name, commit=commit, error=message)
                broken = result if isinstance(result, Broken) else None
                self._record(failure_event(broken) if broken else "team.invalid",
                             team=config.name, commit=commit, rule=rule,
                             file=broken.file if broken else None, reason=message[:500])
            return
        new = Snapshot(config, commit, result)
        self._snapshots[config.name] = new
        if old is not None:
            self._end(old, new)
        self._record("team.reloaded", team=config.name, commit=commit, count=len(result.secrets))
        log.info("team.reloaded", team=config.name, commit=commit, secrets=len(result.secrets))

    def _end(self, old: Snapshot, new: Snapshot | None) -> None:
        """Leases of refs whose version changed (or that are gone) end, audited."""
        if old.team is None:
            return
        prefix = old.config.ref_prefix
        for ref, secret in old.team.secrets.items():
            now = new.team.secrets.get(ref) if new and new.team else None
            if now is not None and now.envelope.version == secret.envelope.version:
                continue
            served = prefix + ref
            self._values.pop(served, None)
            version = None if now is None else now.envelope.version
            self._secret_changed(served, version)
            if new is None or new.team is None:
                continue  # unavailable, not changed: the failure is audited once
            if now is None:
                self._record("secret.removed", secret_ref=served, team=old.config.name,
                           commit=new.commit, version=secret.envelope.version)
            else:
                self._record("secret.rotated", secret_ref=served, team=old.config.name,
                           commit=new.commit, signer=now.envelope.signed_by, version=version)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


TEAMS: web.AppKey[ServedTeams] = web.AppKey("teams", ServedTeams)


def _untrusted_checkout(path: Path) -> str | None:
    """Why the daemon must not read this work tree, or None."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror}; fix [teams] path in config.toml"
    if st.st_uid != os.getuid():
        return (f"{path} is owned by another user (uid {st.st_uid}): a checkout someone else "
                "can change is not trusted; clone it as yourself")
    if not (path / ".git").exists():
        return f"{path} is not a git work tree (no .git): point [teams] path at a clone"
    return None


def _refs_signature(config: TeamConfig) -> object:
    """What changes when a commit lands: HEAD, the ref it names, packed refs."""
    git = Path(config.path) / ".git"
    paths = [git / "HEAD", git / "packed-refs"]
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        head = ""
    if head.startswith("ref: "):
        paths.append(git / head[5:])
    if config.ref.startswith("refs/"):
        paths.append(git / config.ref)
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return (head, tuple(out))
