"""The service layer under the CLI and the daemon: every rule about secrets lives here once.

Callers (CLI commands, HTTP handlers) parse input, call one method, and render the result.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from broker import audit
from broker.config import (
    Config,
    Home,
    check_private,
    load_config,
    parse_duration,
    render_config,
    write_private,
)
from broker.errors import BrokerError, NotFound, UsageError
from broker.metadata import Metadata, SecretMeta, TokenMeta
from broker.store import KINDS, SecretStore, choose_backend, open_store, parse_ref

INSTANCE_KEY = "!instance-key"
TOKEN_PREFIX = "sbt_"  # noqa: S105 - a prefix, not a token
CONSUMER_TOKEN_PREFIX = "sbc_"  # noqa: S105 - a prefix, not a token
CONSUMER_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

EXAMPLE_GRANTS = """\
# secrets.grants.toml: who may use which secret, for what, where. Deny by default:
# a request is allowed only when one grant matches its secret, consumer, purpose,
# delivery and upstream host. Every grant below is commented out, so nothing is allowed.
# Check your edits with `secret-broker grants check`.

# [[grants]]
# secret_ref = "openai_api_key"
# consumer = "ugent-core"
# purposes = ["llm.chat", "llm.embeddings"]
# delivery = ["native", "http_header_inject"]
# allowed_hosts = ["api.openai.com"]
# ttl_secs = 300
"""


def new_token(prefix: str = TOKEN_PREFIX) -> str:
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


@dataclass(frozen=True)
class InitResult:
    home: Home
    backend: str
    why: str
    created: bool
    key_file: bool = False


def init_home(home: Home, requested: str | None, environ: Mapping[str, str] | None = None
              ) -> InitResult:
    """Create the home; on an existing home, change nothing and say so."""
    if home.config.exists():
        config = load_config(home)
        return InitResult(home, config.backend, "this home already exists; nothing was changed",
                          created=False)
    choice = choose_backend(requested, environ)
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    home.run.mkdir(mode=0o700, exist_ok=True)
    key_file = False
    if choice.backend == "file-vault":
        from broker.vault import create_vault

        key_file = create_vault(home, choice.passphrase) == "keyfile"
    metadata = Metadata(home.metadata)
    metadata.set_meta("instance_id", uuid.uuid4().hex)
    metadata.close()
    write_private(home.token, (new_token() + "\n").encode())
    write_private(home.grants, EXAMPLE_GRANTS.encode())
    svc = Service(home, environ)
    svc.store.put(INSTANCE_KEY, base64.b64encode(secrets.token_bytes(32)).decode(), 1)
    # config.toml last: its presence is what marks the home as initialised.
    write_private(home.config, render_config(choice.backend).encode())
    svc.record("broker.initialized", backend=choice.backend)
    return InitResult(home, choice.backend, choice.why, created=True, key_file=key_file)


class Service:
    """One home, opened lazily: `list` never unlocks the store, `add` does once."""

    def __init__(self, home: Home, environ: Mapping[str, str] | None = None,
                 actor: str = "cli", audit_fsync: str = "always") -> None:
        self.home = home
        self.environ = os.environ if environ is None else environ
        self.actor = actor
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
        checkpoints = Metadata(self.home.metadata)
        return audit.AuditLog(self.home.audit, self.derived_key("audit-log"),
                              checkpoints.advance_checkpoint, self._audit_fsync)

    def record(self, event: str, **fields: Any) -> None:
        self.audit_log.append(event, self.actor, **fields)

    def fingerprint(self, value: str) -> str:
        """A keyed hash: equal values match, but it reveals nothing of the value."""
        digest = hmac.new(self.derived_key("fingerprint"), value.encode(), hashlib.sha256)
        return "hmac-sha256:" + digest.hexdigest()[:16]

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Serialise mutations across processes (version bumps must not race)."""
        fd = os.open(self.home.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- secrets ------------------------------------------------------------------------

    def add(self, ref: str, provider: str, kind: str, value: str) -> SecretMeta:
        ref = parse_ref(ref)
        if not PROVIDER_RE.fullmatch(provider):
            raise UsageError(f"invalid provider {provider!r}: use lower-case letters, digits, - _")
        if kind not in KINDS:
            raise UsageError(f"invalid kind {kind!r}: use one of {', '.join(KINDS)}")
        _check_value(value)
        with self._writing():
            self.metadata.require_absent(ref)
            now = audit.rfc3339()
            meta = SecretMeta(ref, provider, kind, self.store.name, self.fingerprint(value), 1,
                              now, None, None)
            self.record("secret.added", secret_ref=ref, provider=provider, kind=kind,
                        backend=self.store.name, version=1)
            self.store.put(ref, value, 1)
            self.metadata.insert(meta)
        return meta

    def rotate(self, ref: str, value: str) -> SecretMeta:
        ref = parse_ref(ref)
        _check_value(value)
        with self._writing():
            old = self.metadata.get(ref)
            version = old.version + 1
            self.record("secret.rotated", secret_ref=ref, version=version)
            self.store.put(ref, value, version)
            self.metadata.set_value_info(ref, self.fingerprint(value), version, audit.rfc3339())
        return self.metadata.get(ref)

    def remove(self, ref: str) -> SecretMeta:
        ref = parse_ref(ref)
        with self._writing():
            meta = self.metadata.get(ref)
            self.record("secret.removed", secret_ref=ref, version=meta.version)
            self.store.delete(ref)
            self.metadata.delete(ref)
        return meta

    def list_secrets(self) -> list[SecretMeta]:
        return self.metadata.all()

    def inspect(self, ref: str) -> SecretMeta:
        return self.metadata.get(parse_ref(ref))

    def value(self, ref: str) -> str:
        """The value of a known ref, for exec and the daemon (callers audit the use)."""
        ref = parse_ref(ref)
        self.metadata.get(ref)  # a ref without metadata is "not found", whatever the store has
        return self.store.get(ref)

    def touch(self, ref: str) -> None:
        self.metadata.touch(ref, audit.rfc3339())

    # --- the bootstrap token ---------------------------------------------------------------

    def read_token(self) -> str:
        check_private(self.home.token)
        try:
            return self.home.token.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise BrokerError(f"{self.home.token} is missing; run `secret-broker token rotate`") \
                from None

    def rotate_token(self) -> None:
        with self._writing():
            self.record("token.rotated")
            write_private(self.home.token, (new_token() + "\n").encode())

    # --- consumer tokens ------------------------------------------------------------------

    def create_token(self, consumer: str, ttl: str | None = None,
                     description: str | None = None) -> tuple[TokenMeta, str]:
        """A new `sbc_` token for `consumer`; the value is returned once and never stored."""
        if not CONSUMER_RE.fullmatch(consumer):
            raise UsageError(f"invalid consumer {consumer!r}: use 1-128 of A-Z a-z 0-9 _ . -")
        expires_at = None
        if ttl is not None:
            seconds = parse_duration(ttl)
            if not seconds:
                raise UsageError(f"--ttl {ttl!r}: use a positive duration like 90s, 30m, 12h, 7d")
            expires_at = audit.rfc3339(time.time() + seconds)
        if description is not None and (len(description) > 500 or "\n" in description):
            raise UsageError("the description must be one line of at most 500 characters")
        token = new_token(CONSUMER_TOKEN_PREFIX)
        meta = TokenMeta("tok_" + secrets.token_hex(8), token_hash(token), consumer,
                         description, audit.rfc3339(), expires_at, None, None, None)
        self.record("token.created", token_id=meta.id, consumer=consumer)
        self.metadata.insert_token(meta)
        return meta, token

    def list_tokens(self) -> list[TokenMeta]:
        return self.metadata.tokens()

    def revoke_tokens(self, *, token_id: str | None = None,
                      consumer: str | None = None) -> list[TokenMeta]:
        known = self.metadata.tokens()
        if token_id is not None and token_id not in {t.id for t in known}:
            raise NotFound(f"no token {token_id}; see `secret-broker token list`",
                           code="token_not_found")
        if consumer is not None and consumer not in {t.consumer for t in known}:
            raise NotFound(f"no token for consumer {consumer!r}", code="token_not_found")
        revoked = self.metadata.revoke_tokens(audit.rfc3339(), token_id=token_id,
                                              consumer=consumer)
        for token in revoked:
            self.record("token.revoked", token_id=token.id, consumer=token.consumer)
        return revoked

    # --- audit queries ------------------------------------------------------------------

    def audit_events(self, *, ref: str | None = None, event: str | None = None,
                     since: str | None = None, limit: int | None = None
                     ) -> list[dict[str, Any]]:
        """Matching events, newest last (the last `limit` of them)."""
        check_private(self.home.audit)
        ref = parse_ref(ref) if ref else None
        after = audit.parse_since(since) if since else None
        events = [e for e in audit.read_events(self.home.audit)
                  if audit.matches(e, ref=ref, event=event, since=after)]
        return events[-limit:] if limit else events

    def verify_audit(self) -> audit.Verdict:
        check_private(self.home.audit)
        return audit.verify(audit.read_lines(self.home.audit), self.derived_key("audit-log"),
                            self.metadata.checkpoint())

    def as_actor(self, actor: str) -> Service:
        """The same opened home (store, audit writer, DB) recording as another actor."""
        for name in ("config", "metadata", "store", "audit_log"):
            getattr(self, name)  # open them once, so the view shares them
        view = copy.copy(self)
        view.actor = actor
        return view


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_value(value: str) -> None:
    if not value:
        raise UsageError("the value is empty; nothing was stored")
    if "\x00" in value:
        raise UsageError("the value contains a NUL byte; nothing was stored")
