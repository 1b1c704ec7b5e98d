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
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.config import Config, load_config, render_config
from broker.core.clock import parse_duration, utc_day
from broker.core.digest import token_hash
from broker.core.errors import (
    BrokerError,
    NotFound,
    SecretExists,
    SecretNotFound,
    UnlockFailed,
    UsageError,
)
from broker.core.home import Home, check_private, write_private
from broker.core.refs import CONSUMER_RE, PROVIDER_RE, parse_ref
from broker.gateway.usage import DIMENSIONS, UsageRow, group
from broker.store import audit
from broker.store.backend import KINDS, SecretStore, choose_backend, open_store
from broker.store.metadata import Metadata, SecretMeta, TokenMeta, case_twin_message

if TYPE_CHECKING:
    from broker.service.profiles import Profile
    from broker.service.transfer import ExportedSecret

INSTANCE_KEY = "!instance-key"
TOKEN_PREFIX = "sbt_"  # noqa: S105 - a prefix, not a token
CONSUMER_TOKEN_PREFIX = "sbc_"  # noqa: S105 - a prefix, not a token
# No API key, token or certificate comes near it; it keeps a mistaken file (a disk image
# piped to `add`) out of the store, the daemon's memory and every export.
MAX_VALUE_BYTES = 64 * 1024
MAX_VERSION = 2**53 - 1  # exact in every JSON reader; rotate never gets near it

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
    """Create the home; on an existing home, change nothing and say so.

    A home whose config.toml is missing is refused, not re-created: new keys and a new
    instance id would make every stored secret and the audit chain unreadable.
    """
    if home.config.exists():
        config = load_config(home)
        if requested is not None and requested != config.backend:
            raise BrokerError(
                f"{home.root} already exists with the {config.backend} store; init does not "
                f"change it to {requested} (nothing was changed). To move the secrets: "
                f"`secret-broker export`, init a new home with --backend {requested}, then "
                "`secret-broker import`")
        return InitResult(home, config.backend, "this home already exists; nothing was changed",
                          created=False)
    if home.root.exists() and not home.root.is_dir():
        raise UsageError(f"{home.root} is not a directory; point SECRET_BROKER_HOME at a "
                         "directory (it is created if missing)")
    found = _home_leftovers(home)
    if found:
        backend = "file-vault" if any(f.startswith("vault") for f in found) else "keychain"
        raise BrokerError(
            f"{home.root} holds an existing secret-broker home ({', '.join(found)}) but no "
            "config.toml; init changed nothing, since new keys would make its secrets "
            f"unreadable. Restore config.toml from a backup, or write one holding [store] "
            f'backend = "{backend}", then run `secret-broker check`; to start afresh, move '
            f"{home.root} away first", code="home_exists")
    choice = choose_backend(requested, environ)
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    home.run.mkdir(mode=0o700, exist_ok=True)
    key_file = False
    if choice.backend == "file-vault":
        from broker.store.vault import create_vault

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


def _home_leftovers(home: Home) -> list[str]:
    """What an earlier home left that init would overwrite (paths relative to the root)."""
    vault = sorted(p for p in home.vault.glob("*") if p.name == "header.json"
                   or p.suffix == ".sbv")
    files = [*vault, home.vault_key, home.token, home.audit, home.grants]
    found = [str(p.relative_to(home.root)) for p in files if os.path.lexists(p)]
    if _holds_rows(home.metadata):
        found.append(home.metadata.name)
    return found


def _holds_rows(path: Path) -> bool:
    """Whether a metadata DB records anything (opening one only writes `generation`).

    Read as immutable, so no -shm or -wal file is left behind; a write-ahead log not yet
    folded in, or a file that cannot be read, counts as rows: neither is init's to replace.
    """
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return True
    if not path.exists() or path.stat().st_size == 0:
        return False
    try:
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            tables = [row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            return any(db.execute(f'SELECT 1 FROM "{table}"'  # noqa: S608 - names from the DB
                                  + (" WHERE key != 'generation'" if table == "meta" else "")
                                  + " LIMIT 1").fetchone() for table in tables)
        finally:
            db.close()
    except sqlite3.Error:
        return True


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
        _check_secret(provider, kind, value)
        with self._writing():
            self.metadata.require_absent(ref)
            now = audit.rfc3339()
            meta = SecretMeta(ref, provider, kind, self.store.name, self.fingerprint(value), 1,
                              now, None, None)
            self.record("secret.added", secret_ref=ref, provider=provider, kind=kind,
                        backend=self.store.name, version=1)
            self.metadata.delete_meta(_note(ref))  # a note of an earlier incarnation
            self.store.put(ref, value, 1)
            self.metadata.insert(meta)
        return meta

    def rotate(self, ref: str, value: str) -> SecretMeta:
        ref = parse_ref(ref)
        _check_value(value)
        with self._writing():
            old = self._settle_rotate(self.metadata.get(ref))
            version = old.version + 1
            self.record("secret.rotated", secret_ref=ref, version=version)
            fingerprint = self._replace_value(ref, value, version)
            self.metadata.set_value_info(ref, fingerprint, version, audit.rfc3339())
        return self.metadata.get(ref)

    def _replace_value(self, ref: str, value: str, version: int) -> str:
        """Store a value over a live one (rotate, import --replace); returns its fingerprint.

        Noted before the store write: a crash between that write and the metadata update
        leaves the new value, which value() must still hand out (SPEC §3)."""
        fingerprint = self.fingerprint(value)
        self.metadata.set_meta(_note(ref), f"{version}:{fingerprint}")
        self.store.put(ref, value, version)
        return fingerprint

    def _noted(self, meta: SecretMeta) -> tuple[int, str] | None:
        """The (version, fingerprint) a replace killed mid-way was writing past `meta`."""
        version, _, fingerprint = (self.metadata.get_meta(_note(meta.ref)) or "").partition(":")
        if not version.isdigit() or int(version) <= meta.version:
            return None
        return int(version), fingerprint

    def _settle_rotate(self, meta: SecretMeta) -> SecretMeta:
        """Record a replace that was killed after its store write, before noting another."""
        noted = self._noted(meta)
        if noted is None:
            return meta
        try:
            fingerprint = self.fingerprint(self.store.get(meta.ref))
        except BrokerError:
            return meta  # unreadable: the rotate under way replaces it anyway
        if not hmac.compare_digest(fingerprint, noted[1]):
            return meta  # killed before its store write: the store still holds `meta`'s value
        self.metadata.set_value_info(meta.ref, fingerprint, noted[0], audit.rfc3339())
        return self.metadata.get(meta.ref)

    def remove(self, ref: str) -> SecretMeta:
        ref = parse_ref(ref)
        with self._writing():
            meta = self.metadata.get(ref)
            self.record("secret.removed", secret_ref=ref, version=meta.version)
            self.store.delete(ref)
            self.metadata.delete(ref)
            # A vault file of this incarnation, restored later, must not match the note.
            self.metadata.delete_meta(_note(ref))
        return meta

    def list_secrets(self) -> list[SecretMeta]:
        return self.metadata.all()

    def inspect(self, ref: str) -> SecretMeta:
        return self.metadata.get(parse_ref(ref))

    def value(self, ref: str) -> str:
        """The value of a known ref, for exec and the daemon (callers audit the use).

        Only the value the metadata records (its keyed fingerprint) is handed out: a vault
        file restored from an old copy still decrypts, but it holds a retired value."""
        ref = parse_ref(ref)
        meta = self.metadata.get(ref)  # no metadata is "not found", whatever the store has
        value, sealed = self.store.get_versioned(ref)
        fingerprint = self.fingerprint(value)
        # An interrupted replace (the store holds a later version, metadata still this one)
        # is not a rollback: accept exactly the value and version it was writing.
        noted = self._noted(meta)
        if hmac.compare_digest(fingerprint, meta.fingerprint):
            version = meta.version
        elif noted is not None and hmac.compare_digest(fingerprint, noted[1]):
            version = noted[0]
        else:
            raise UnlockFailed(f"{self.store.location(ref)} does not hold the value of @{ref} "
                               "that its metadata records (restored from an old copy, or "
                               f"changed outside secret-broker); rotate @{ref} to fix it")
        if sealed is not None and sealed != version:
            raise UnlockFailed(f"{self.store.location(ref)} holds version {sealed} of @{ref} but "
                               f"its metadata records version {version} (restored from an old "
                               f"copy); rotate @{ref} to fix it")
        return value

    def touch(self, ref: str) -> None:
        self.metadata.touch(ref, audit.rfc3339())

    def resolve_for(self, refs: Iterable[str], event: str, consumer: str | None = None,
                    env: Mapping[str, str] | None = None) -> dict[str, str]:
        """ref -> value for every ref, or nothing: all missing refs are named at once.

        One `event` per ref is audited (never a value) before any value is handed back;
        `env` (ref -> variable names) records where exec puts each one.
        """
        wanted = list(dict.fromkeys(parse_ref(ref) for ref in refs))
        missing = [ref for ref in wanted if self.metadata.find(ref) is None]
        if missing:
            raise SecretNotFound(f"no secret {', '.join('@' + r for r in missing)}; "
                                 "see `secret-broker list`")
        values = {ref: self.value(ref) for ref in wanted}
        for ref in wanted:
            self.record(event, secret_ref=ref, consumer=consumer,
                        env=None if env is None else env[ref], outcome="allowed")
            self.touch(ref)
        return values

    def authorized_profile(self, name: str) -> Profile:
        """A profile whose consumer holds an env grant for each of its refs (SPEC §13).

        Deny by default: each refused ref is audited, then the launch is refused as a
        whole, naming the grants to add.
        """
        # Imported here: a plain `exec` needs neither profiles nor the grants loader.
        from broker.service.profiles import denied, env_denials, find_profile, load_profiles
        from grants import load_grants

        profile = find_profile(load_profiles(self.home.profiles), name, self.home.profiles)
        denials = env_denials(profile, load_grants(self.home.grants))
        for ref, reason in denials.items():
            self.record("secret.exec", secret_ref=ref, consumer=profile.consumer,
                        delivery="env", outcome="denied", reason=reason)
        if denials:
            raise denied(profile, denials, self.home.grants)
        return profile

    # --- moving a home (export / import) ----------------------------------------------------

    def export_secrets(self) -> list[ExportedSecret]:
        """Every secret with its value; all are read, then each is audited `secret.exported`."""
        from broker.service.transfer import ExportedSecret

        exported = [ExportedSecret(m.ref, m.provider, m.kind, m.version, m.created_at,
                                   m.rotated_at, self.value(m.ref)) for m in self.metadata.all()]
        for s in exported:
            self.record("secret.exported", secret_ref=s.ref, version=s.version)
        return exported

    def import_secrets(self, entries: Sequence[ExportedSecret], *,
                       replace: bool) -> list[SecretMeta]:
        """Store each secret in this home's backend, audited `secret.imported`.

        Refs that exist are refused, all named and nothing imported, unless `replace`; a
        replaced ref's version moves past its old one, so the daemon drops the old value
        and the leases that carry it.
        """
        _check_entries(entries)  # every entry, before anything is written
        with self._writing():
            for s in entries:
                twin = self.metadata.case_twin(s.ref)
                if twin is not None:
                    raise SecretExists(f"{case_twin_message(s.ref, twin)}; nothing was imported")
            old = {s.ref: self.metadata.find(s.ref) for s in entries}
            taken = [f"@{ref}" for ref, meta in old.items() if meta is not None]
            if taken and not replace:
                raise SecretExists(f"{', '.join(taken)} already exist(s) here; nothing was "
                                   "imported (pass --replace to overwrite them)")
            imported = []
            for s in entries:
                before = old[s.ref]
                version = s.version if before is None else max(s.version, before.version + 1)
                self.record("secret.imported", secret_ref=s.ref, provider=s.provider,
                            kind=s.kind, backend=self.store.name, version=version,
                            outcome="added" if before is None else "replaced")
                if before is None:
                    self.metadata.delete_meta(_note(s.ref))  # of an earlier incarnation
                    self.store.put(s.ref, s.value, version)
                    fingerprint = self.fingerprint(s.value)
                else:
                    fingerprint = self._replace_value(s.ref, s.value, version)
                meta = SecretMeta(s.ref, s.provider, s.kind, self.store.name, fingerprint,
                                  version, s.created_at, s.rotated_at, None)
                self.metadata.insert(meta, replace=True)
                imported.append(meta)
        return imported

    # --- the bootstrap token ---------------------------------------------------------------

    def rotate_token(self) -> None:
        with self._writing():
            self.record("token.rotated")
            write_private(self.home.token, (new_token() + "\n").encode())

    # --- consumer tokens ------------------------------------------------------------------

    def create_token(self, consumer: str, ttl: str | None = None,
                     description: str | None = None,
                     daily_tokens: int | None = None) -> tuple[TokenMeta, str]:
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
        if daily_tokens is not None and (isinstance(daily_tokens, bool) or daily_tokens < 1):
            raise UsageError("--daily-tokens must be a positive whole number")
        token = new_token(CONSUMER_TOKEN_PREFIX)
        meta = TokenMeta("tok_" + secrets.token_hex(8), token_hash(token), consumer,
                         description, audit.rfc3339(), expires_at, None, None, daily_tokens)
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
        if not limit:
            return [e for e in audit.read_events(self.home.audit)
                    if audit.matches(e, ref=ref, event=event, since=after)]
        newest: list[dict[str, Any]] = []  # read from the end: memory bounded by `limit`
        for e in audit.read_events(self.home.audit, newest_first=True):
            if audit.matches(e, ref=ref, event=event, since=after):
                newest.append(e)
                if len(newest) == limit:
                    break
        return newest[::-1]

    def verify_audit(self) -> audit.Verdict:
        check_private(self.home.audit)
        return audit.verify(audit.read_lines(self.home.audit), self.derived_key("audit-log"),
                            self.metadata.checkpoint())

    def reseal_audit(self) -> audit.Verdict:
        """Trust the log as it is now: when every line's MAC and the chain hold, seal a new
        checkpoint at its end and record that this was done (a deliberate owner's act)."""
        check_private(self.home.audit)
        verdict, checkpoint = audit.resealed(audit.read_lines(self.home.audit),
                                             self.derived_key("audit-log"))
        if verdict.ok:
            self.metadata.replace_checkpoint(checkpoint)
            self.record("audit.resealed", count=verdict.checked)
        return verdict

    def usage(self, *, since: str | None = None, by: str | None = None,
              consumer: str | None = None) -> list[UsageRow]:
        """Usage rows since a day (or a duration ago), added up over the `by` dimensions."""
        dims = tuple(d.strip() for d in by.split(",")) if by else DIMENSIONS
        unknown = [d for d in dims if d not in DIMENSIONS]
        if unknown:
            raise UsageError(f"cannot group usage by {', '.join(unknown)}: use "
                             f"{', '.join(DIMENSIONS)}")
        day = None
        if since:
            day = utc_day(audit.parse_since(since))
        return group(self.metadata.usage(day, consumer), dims)

    def as_actor(self, actor: str) -> Service:
        """The same opened home (store, audit writer, DB) recording as another actor."""
        for name in ("config", "metadata", "store", "audit_log"):
            getattr(self, name)  # open them once, so the view shares them
        view = copy.copy(self)
        view.actor = actor
        return view


def _check_secret(provider: str, kind: str, value: str) -> None:
    if not PROVIDER_RE.fullmatch(provider):
        raise UsageError(f"invalid provider {provider!r}: use lower-case letters, digits, - _")
    if kind not in KINDS:
        raise UsageError(f"invalid kind {kind!r}: use one of {', '.join(KINDS)}")
    _check_value(value)


def _check_value(value: str) -> None:
    if not value:
        raise UsageError("the value is empty; nothing was stored")
    if "\x00" in value:
        raise UsageError("the value contains a NUL byte; nothing was stored")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError("the value is not valid Unicode text (an unpaired surrogate); "
                         "nothing was stored") from None
    if size > MAX_VALUE_BYTES:
        raise UsageError(f"the value is {size} bytes; values are limited to 64 KiB "
                         f"({MAX_VALUE_BYTES} bytes); nothing was stored")


def _check_entries(entries: Sequence[ExportedSecret]) -> None:
    """Every imported entry is valid, and no two refs differ only in case; the first
    fault is named by its ref (never a value)."""
    seen: dict[str, str] = {}
    for s in entries:
        ref = parse_ref(s.ref)
        try:
            _check_secret(s.provider, s.kind, s.value)
        except UsageError as exc:
            raise UsageError(f"@{ref}: {exc.message}") from None
        if isinstance(s.version, bool) or not 1 <= s.version <= MAX_VERSION:
            raise UsageError(f"@{ref}: version {s.version} is outside 1..{MAX_VERSION}; "
                             "nothing was imported")
        if ref.lower() in seen:
            raise UsageError(f"@{seen[ref.lower()]} and @{ref} are both in the export and "
                             "refs are compared without case; nothing was imported")
        seen[ref.lower()] = ref


def _note(ref: str) -> str:
    """The metadata key noting a value replace under way: "version:fingerprint"."""
    return f"rotating:{ref}"
