"""The daemon's runtime state, one object per job, and the `AppKey`s handlers find it under.

`app.py` builds these once and sets them on the application; a handler reads
`request.app[KEY]` and never imports the module that wires the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import Counter
from typing import Any

import structlog
from aiohttp import web

from broker.config import Config, load_config
from broker.core.clock import parse_rfc3339, rfc3339, utc_day
from broker.core.errors import (
    AuditUnavailable,
    BrokerError,
    BudgetExceeded,
    InsecureFile,
    SecretNotFound,
    SecretUnavailable,
    UnlockFailed,
)
from broker.core.home import Home, file_signature
from broker.core.loopback import is_loopback_host
from broker.gateway.providers import Provider, build_providers
from broker.gateway.usage import Budgets, Reservation, UsageBook
from broker.server.access import Access
from broker.server.auth import (
    Authenticator,
    ConsumerToken,
    FailureThrottle,
    Principal,
    RefusalTally,
)
from broker.server.shared import SharedBudgets
from broker.server.teams import ServedTeams
from broker.service.context import Context
from broker.service.secrets import Secrets
from broker.store.metadata import Metadata

log = structlog.get_logger("broker")


class AuditRecorder:
    """Writes the daemon's audit events; refuses requests while the log cannot be written,
    and keeps a flood of refusals from filling it (`RefusalTally`, `FailureThrottle`)."""

    def __init__(self, service: Context, throttle: FailureThrottle | None = None) -> None:
        # Held directly, not through the Context: they are used on every request.
        self._log, self._actor, self._path = service.audit_log, service.actor, service.home.audit
        self.broken = False
        self.throttle = throttle or FailureThrottle()
        self.refusals = RefusalTally()
        self._later: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        """Append to the audit log; a failure marks it broken so requests are refused.
        Records queued by `record_later` go first: the chain keeps the order of the calls."""
        self._later.append((event, fields))
        self._write()

    def record_later(self, event: str, **fields: Any) -> None:
        """For a finished request: queued, and written with the others finished in the same
        turn of the event loop, under one lock and in one write; a failure is logged."""
        self._later.append((event, fields))
        if len(self._later) == 1:
            asyncio.get_running_loop().call_soon(self.write_queued)

    def write_queued(self) -> None:
        """Write what `record_later` queued (at the latest, at shutdown)."""
        if not self._later:
            return
        events = [event for event, _fields in self._later]
        try:
            self._write()
        except AuditUnavailable as exc:
            log.error("audit.failed", audit_event=",".join(sorted(set(events))),
                      count=len(events), error=exc.message)

    def _write(self) -> None:
        events, self._later = self._later, []
        try:
            self._log.append_many(events, self._actor)
        except AuditUnavailable:
            self.broken = True
            raise
        self.broken = False

    def record_safely(self, event: str, **fields: Any) -> None:
        """For events after the fact (a finished request): log a failure, do not raise."""
        try:
            self.record(event, **fields)
        except AuditUnavailable as exc:
            log.error("audit.failed", audit_event=event, error=exc.message)

    def check_audit(self) -> None:
        """Before acting: 503 while the log's file system is full or read-only; and while
        the log is broken, each request first tries to write again (or is 503)."""
        if not self._log.has_room():
            self.broken = True
            raise AuditUnavailable(f"the audit log {self._path} has no room (its "
                                   "file system is full or read-only); the request was refused")
        if self.broken:
            self.record("audit.resumed")

    async def refuse(self, request: web.Request, event: str, reason: str, status: int,
                     **fields: Any) -> None:
        """An unauthenticated refusal (foreign Host or Origin, bad or missing token, bad login
        code): audited and logged once per peer, reason and window, the rest counted
        (`RefusalTally`), and slowed (`FailureThrottle`), so a flood neither fills the disk
        nor guesses fast. A valid token never comes here, so the owner is never slowed."""
        peer = request.remote or "unix"
        # Any local process may bind any 127/8 source address, so loopback peers share
        # one bucket: rotating addresses must not reset the slowdown nor open new windows.
        bucket = "loopback" if is_loopback_host(peer) else peer
        request["refused"] = True  # the tally's lines stand in for the per-request log line
        delay = self.throttle.penalty(bucket)
        first = {"reason": reason, "peer": peer, "status": status,
                 "route": request.path[:200], **fields}
        if self.refusals.first(event, bucket, first, delay):
            self.record(event, **first)
            log.warning(event, **first, delay_ms=round(delay * 1000))
        await asyncio.sleep(delay)

    def flush_refusals(self, *, everything: bool = False) -> None:
        """Write the refusals counted in windows that closed (all of them at shutdown)."""
        for event, fields, delay in self.refusals.closed(everything=everything):
            self.record_safely(event, **fields)
            log.warning(event, **fields, delay_ms=round(delay * 1000))


class SecretsCache:
    """What metadata.db says of secrets and consumer tokens, re-read only when another
    process committed a change; the values read so far (in memory only); and what was used
    since the last-used times were written."""

    def __init__(self, service: Context, access: Access, auth: Authenticator,
                 teams: ServedTeams) -> None:
        self._service = service
        self._teams = teams
        self._metadata = service.metadata  # asked on every request
        self._access = access
        self._auth = auth
        self._data_version = -1
        self._generation = -1
        self._secrets: dict[str, tuple[int, str]] = {}  # ref -> (version, provider)
        self._values: dict[str, tuple[int, str]] = {}  # ref -> (version, value)
        self._used: set[str] = set()
        self._ended_tokens: set[str] = set()
        self.tokens_used: set[str] = set()

    def refresh(self, *, force: bool = False) -> None:
        """Re-read secrets and consumer tokens when another process committed a change
        (`PRAGMA data_version`), or after the daemon's own change (`force`)."""
        metadata = self._metadata
        version = metadata.data_version()
        if version == self._data_version and not force:
            return
        self._data_version = version
        generation = metadata.generation()
        if generation == self._generation and not force:
            return  # a commit that touched neither secrets nor tokens
        self._generation = generation
        fresh = {m.ref: (m.version, m.provider) for m in metadata.all()}
        for ref, (old, _provider) in self._secrets.items():
            new = fresh.get(ref)
            if new is None or new[0] != old:
                self._values.pop(ref, None)
                self._access.secret_changed(ref, None if new is None else new[0])
        self._secrets = fresh
        self._auth.reread()  # `token rotate` moved the generation
        self._auth.consumer_tokens = {
            t.hash: ConsumerToken(t.id, t.consumer, parse_rfc3339(t.expires_at),
                                  t.revoked_at is not None, t.daily_tokens)
            for t in metadata.tokens()}
        self.end_leases_of_dead_tokens()

    def end_leases_of_dead_tokens(self) -> None:
        """A revoked or expired token's consumer loses its leases at once (they are
        minted again on demand for a token that still works)."""
        now = time.time()
        for token in self._auth.consumer_tokens.values():
            dead = token.revoked or (token.expires_at is not None and now >= token.expires_at)
            if dead and token.token_id not in self._ended_tokens:
                self._ended_tokens.add(token.token_id)
                self._access.consumer_ended(token.consumer, f"token {token.token_id} ended")

    def secret_version(self, ref: str) -> int:
        # No refresh here: the auth middleware refreshed at the start of this request.
        if ref.startswith(self._teams.prefixes):
            if ref in self._secrets:
                raise SecretUnavailable(f"@{ref} is both a local secret and a team's: neither "
                                        "is served under that name until the local one is "
                                        "renamed")
            return self._teams.version(ref)
        found = self._secrets.get(ref)
        if found is None:
            raise SecretNotFound(f"no secret @{ref}; add it with `secret-broker add @{ref}`")
        return found[0]

    def value(self, ref: str, version: int) -> str:
        if ref.startswith(self._teams.prefixes):
            return self._teams.value(ref, version)
        self._used.add(ref)  # last-used times are written in the background, once a second
        return self._value(ref, version)

    def stored_values(self) -> list[str]:
        """Every stored value that can be read, to scrub an answer with (not a use)."""
        values = []
        for ref, (version, _provider) in list(self._secrets.items()):
            with contextlib.suppress(SecretUnavailable):  # unread, so never sent anywhere
                values.append(self._value(ref, version))
        for ref, (version, _provider) in self._teams.served().items():
            with contextlib.suppress(SecretUnavailable):
                values.append(self._teams.value(ref, version))
        return values

    def _value(self, ref: str, version: int) -> str:
        cached = self._values.get(ref)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            value = Secrets(self._service).value(ref)  # refuses a value not in metadata
        except (SecretNotFound, UnlockFailed, InsecureFile) as exc:
            raise SecretUnavailable(f"the value of @{ref} cannot be read",
                                    detail=exc.message) from None
        self._values[ref] = (version, value)
        return value

    def secret_for(self, provider: Provider) -> str:
        """The provider's configured secret_ref, else its one secret."""
        if provider.secret_ref is not None:
            return provider.secret_ref
        refs = [r for r, (_v, p) in self._secrets.items() if p == provider.name]
        if self._teams.prefixes:
            refs += self._teams.refs_for(provider.name)
        if len(refs) == 1:
            return refs[0]
        if not refs:
            raise SecretUnavailable(
                f"no secret for provider {provider.name}: add one with `secret-broker add "
                f"@{provider.name}_api_key --provider {provider.name} --kind api_key --stdin`")
        raise SecretUnavailable(
            f"several secrets for provider {provider.name} ({', '.join(sorted(refs))}): set "
            f"[providers.{provider.name}] secret_ref in config.toml or send X-Broker-Secret-Ref")

    def flush_last_used(self) -> None:
        used, self._used = self._used, set()
        for ref in used:
            Secrets(self._service).touch(ref)
        tokens, self.tokens_used = self.tokens_used, set()
        for token_id in tokens:
            self._service.metadata.touch_token(token_id, rfc3339())


class Spending:
    """Token usage as it happens, and the consumer tokens' daily budgets."""

    def __init__(self, metadata: Metadata, shared: SharedBudgets | None = None) -> None:
        self.usage = UsageBook()
        self.budgets: Budgets | SharedBudgets
        if shared is not None:  # several workers: the supervisor seeded today's spend
            self.budgets = shared
        else:
            self.budgets = Budgets()
            self.budgets.used = metadata.token_spend(utc_day())

    def reserve_budget(self, principal: Principal, estimate: int) -> Reservation | None:
        """Hold `estimate` tokens of a consumer token's daily budget, or 429."""
        if principal.daily_tokens is None or principal.token_id is None:
            return None
        reservation = self.budgets.reserve(principal.token_id, utc_day(), principal.daily_tokens,
                                           estimate)
        if reservation is None:
            raise BudgetExceeded(
                f"consumer {principal.consumer!r} has used its daily budget of "
                f"{principal.daily_tokens} tokens (token {principal.token_id}); it resets at "
                "00:00 UTC, or the owner can issue a token with a larger --daily-tokens")
        return reservation

    def flush_usage(self, metadata: Metadata) -> None:
        """Fold usage into metadata.db; runs in a thread with its own connection."""
        rows, spent = self.usage.drain(), self.budgets.drain()
        if rows or spent:
            metadata.add_usage(rows, spent)


# What a running daemon cannot take from an edited config.toml: the sockets are bound, the
# store is open, the audit log and the upstream session are set up. A restart applies them.
RESTART_ONLY = ("backend", "listen", "workers", "audit_fsync", "connect_timeout_secs",
                "read_timeout_secs", "header_timeout_secs")


class LiveConfig:
    """config.toml as loaded, and the providers built from it; reloaded on SIGHUP.

    A file that fails validation keeps the config in force (logged and audited); the
    settings in RESTART_ONLY keep their running values until a restart."""

    def __init__(self, home: Home, config: Config, audit: AuditRecorder) -> None:
        self._path = home.config
        self._home = home
        self._audit = audit
        self.config = config
        self.providers: dict[str, Provider] = build_providers(config.providers)
        self.loaded_at = time.time()
        self._signature = file_signature(self._path)
        self.restart_needed: tuple[str, ...] = ()

    def reload(self, why: str) -> None:
        signature = file_signature(self._path)
        try:
            fresh = load_config(self._home)
            providers = build_providers(fresh.providers)
        except BrokerError as exc:
            log.error("config.invalid", file=str(self._path), error=exc.message, why=why)
            self._audit.record_safely("config.invalid", reason=exc.message[:2000])
            return
        running = {name: getattr(self.config, name) for name in RESTART_ONLY}
        self.restart_needed = tuple(n for n in RESTART_ONLY if getattr(fresh, n) != running[n])
        self.config = dataclasses.replace(fresh, **running)
        self.providers = providers
        self.loaded_at = time.time()
        self._signature = signature
        log.info("config.reloaded", file=str(self._path), why=why,
                 restart_needed=list(self.restart_needed))
        pending = f"; a restart applies {', '.join(self.restart_needed)}" \
            if self.restart_needed else ""
        self._audit.record_safely("config.reloaded", reason=why + pending)

    def as_json(self) -> dict[str, Any]:
        return {"file": str(self._path), "loaded_at": rfc3339(self.loaded_at),
                "changed_since_load": file_signature(self._path) != self._signature,
                "restart_needed": list(self.restart_needed)}


class ServerInfo:
    """Where the daemon listens, since when, and how its requests ended."""

    def __init__(self, listen: str, workers: int = 1) -> None:
        self.listen = listen
        self.workers = workers  # processes serving, this one among them
        self.pid = os.getpid() if workers == 1 else os.getppid()  # the pid file's: the supervisor
        self.started = time.time()
        self.requests: Counter[str] = Counter()


SERVICE: web.AppKey[Context] = web.AppKey("service", Context)
ADMIN: web.AppKey[Context] = web.AppKey("admin", Context)  # the service acting as `admin`
AUDIT: web.AppKey[AuditRecorder] = web.AppKey("audit", AuditRecorder)
SECRETS: web.AppKey[SecretsCache] = web.AppKey("secrets", SecretsCache)
SPENDING: web.AppKey[Spending] = web.AppKey("spending", Spending)
CONFIG: web.AppKey[LiveConfig] = web.AppKey("config", LiveConfig)
SERVER: web.AppKey[ServerInfo] = web.AppKey("server", ServerInfo)
ACCESS: web.AppKey[Access] = web.AppKey("access", Access)
AUTH: web.AppKey[Authenticator] = web.AppKey("auth", Authenticator)
