"""What every service takes: one opened home, and who acts in it.

`HomeSession` opens a home's config, metadata DB, store and audit writer lazily (`list`
never unlocks the store; `add` does once) and holds them for the process. `Context` pairs
a session with the actor its audit events name; the services (`Secrets`, `Tokens`,
`Queries`, `Launch`, transfer) are thin objects over one.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from broker.config import Config, load_config
from broker.core.errors import BrokerError
from broker.core.home import Home, check_private
from broker.store import audit
from broker.store.backend import SecretStore, open_store
from broker.store.metadata import Metadata

INSTANCE_KEY = "!instance-key"  # the store entry the home's derived keys come from


class HomeSession:
    """One home's config, metadata DB, store and audit writer, each opened on first use."""

    def __init__(self, home: Home, environ: Mapping[str, str] | None = None,
                 audit_fsync: str = "always") -> None:
        self.home = home
        self.environ = os.environ if environ is None else environ
        self._audit_fsync = audit_fsync

    @cached_property
    def config(self) -> Config:
        return load_config(self.home)

    @cached_property
    def metadata(self) -> Metadata:
        return Metadata(self.home.metadata)

    @cached_property
    def instance_id(self) -> str:
        value = self.metadata.get_meta("instance_id")
        if value is None:
            raise BrokerError(f"{self.home.metadata} has no instance id; the home is damaged")
        return value

    @property
    def backend(self) -> str:
        # During init config.toml does not exist yet; the vault header tells which.
        if self.home.config.exists():
            return self.config.backend
        return "file-vault" if (self.home.vault / "header.json").exists() else "keychain"

    @cached_property
    def store(self) -> SecretStore:
        return open_store(self.home, self.backend, self.instance_id, self.environ)

    @cached_property
    def _instance_key(self) -> bytes:
        return base64.b64decode(self.store.get(INSTANCE_KEY))

    def derived_key(self, label: str) -> bytes:
        return hmac.new(self._instance_key, label.encode(), hashlib.sha256).digest()

    @cached_property
    def audit_log(self) -> audit.AuditLog:
        check_private(self.home.audit)
        # Its own connection: in batch mode the checkpoint is written from a flush thread.
        self._checkpoints = Metadata(self.home.metadata)
        return audit.AuditLog(self.home.audit, self.derived_key("audit-log"),
                              self._checkpoints.advance_checkpoint, self._audit_fsync)

    def fingerprint(self, value: str) -> str:
        """A keyed hash: equal values match, but it reveals nothing of the value."""
        digest = hmac.new(self.derived_key("fingerprint"), value.encode(), hashlib.sha256)
        return "hmac-sha256:" + digest.hexdigest()[:16]

    def for_worker(self) -> HomeSession:
        """This session for a forked worker: the same config, unlocked store and keys, but
        its own SQLite connections and audit writer, which must not cross a fork."""
        fresh = HomeSession(self.home, self.environ, self._audit_fsync)
        for name in ("config", "instance_id", "store", "_instance_key"):
            if name in self.__dict__:
                fresh.__dict__[name] = self.__dict__[name]
        return fresh

    def close_metadata(self) -> None:
        """Close the metadata connection (a supervisor's, before it forks workers)."""
        if "metadata" in self.__dict__:
            self.__dict__.pop("metadata").close()

    def close(self) -> None:
        """Flush the audit log and close what was opened (a one-shot caller's, like init)."""
        if "audit_log" in self.__dict__:
            self.__dict__.pop("audit_log").close()
            self._checkpoints.close()
        self.close_metadata()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Serialise mutations across processes (version bumps must not race)."""
        fd = os.open(self.home.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Context:
    """A home session and the actor (`cli`, `broker`, `admin`) its audit events name."""

    session: HomeSession
    actor: str = "cli"

    @classmethod
    def open(cls, home: Home, environ: Mapping[str, str] | None = None, *,
             actor: str = "cli", audit_fsync: str = "always") -> Context:
        return cls(HomeSession(home, environ, audit_fsync), actor)

    def as_actor(self, actor: str) -> Context:
        """The same session under another actor: one audit writer (one hash chain) and one
        DB connection per process, so the daemon's admin API shares the broker's."""
        return Context(self.session, actor)

    def record(self, event: str, **fields: Any) -> None:
        self.session.audit_log.append(event, self.actor, **fields)

    def fingerprint(self, value: str) -> str:
        return self.session.fingerprint(value)

    def writing(self) -> AbstractContextManager[None]:
        return self.session.writing()

    # The session's parts, named directly: what the services and their callers reach for.

    @property
    def home(self) -> Home:
        return self.session.home

    @property
    def environ(self) -> Mapping[str, str]:
        return self.session.environ

    @property
    def backend(self) -> str:
        return self.session.backend

    @property
    def metadata(self) -> Metadata:
        return self.session.metadata

    @property
    def store(self) -> SecretStore:
        return self.session.store

    @property
    def audit_log(self) -> audit.AuditLog:
        return self.session.audit_log
