"""Secrets: add, rotate, remove, read and list them; every rule about a secret, once.

Callers (CLI commands, HTTP handlers) parse input, call one method, and render the result.
A value is replaced in two steps (a note, then the store write) so that one killed midway
is told apart from a value restored from an old copy.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker.core.clock import rfc3339
from broker.core.errors import (
    BrokerError,
    ReadOnlyBackend,
    SecretExists,
    UnlockFailed,
    UsageError,
)
from broker.core.refs import PROVIDER_RE, parse_ref
from broker.service.context import Context
from broker.store.backend import KINDS
from broker.store.metadata import SecretMeta, case_twin_message

# No API key, token or certificate comes near it; it keeps a mistaken file (a disk image
# piped to `add`) out of the store, the daemon's memory and every export.
MAX_VALUE_BYTES = 64 * 1024
MAX_VERSION = 2**53 - 1  # exact in every JSON reader; rotate never gets near it


@dataclass(frozen=True)
class ExportedSecret:
    """A secret with its value and history, as `export` writes and `import` stores it."""

    ref: str
    provider: str
    kind: str
    version: int
    created_at: str
    rotated_at: str | None
    value: str = field(repr=False)


class Secrets:
    """The secrets of one home, changed and read as the context's actor."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _local(self, ref: str) -> str:
        """The ref, unless a team serves it: those change only through `team set`."""
        ref = parse_ref(ref)
        for team in self.ctx.session.config.teams.values():
            if ref.startswith(team.ref_prefix):
                raise ReadOnlyBackend(f"@{ref} belongs to team {team.name}, which is read-only "
                                      f"here: change it with `secret-broker team set "
                                      f"@{ref[len(team.ref_prefix):]} …` in its repository")
        return ref

    def add(self, ref: str, provider: str, kind: str, value: str) -> SecretMeta:
        ref = self._local(ref)
        _check_secret(provider, kind, value)
        with self.ctx.writing():
            self.ctx.metadata.require_absent(ref)
            store = self.ctx.store
            meta = SecretMeta(ref, provider, kind, store.name, self.ctx.fingerprint(value), 1,
                              rfc3339(), None, None)
            self.ctx.record("secret.added", secret_ref=ref, provider=provider, kind=kind,
                            backend=store.name, version=1)
            self.ctx.metadata.delete_meta(_note(ref))  # a note of an earlier incarnation
            store.put(ref, value, 1)
            self.ctx.metadata.insert(meta)
        return meta

    def rotate(self, ref: str, value: str) -> SecretMeta:
        ref = self._local(ref)
        _check_value(value)
        with self.ctx.writing():
            old = self._settle_rotate(self.ctx.metadata.get(ref))
            version = old.version + 1
            self.ctx.record("secret.rotated", secret_ref=ref, version=version)
            fingerprint = self._replace_value(ref, value, version)
            self.ctx.metadata.set_value_info(ref, fingerprint, version, rfc3339())
        return self.ctx.metadata.get(ref)

    def _replace_value(self, ref: str, value: str, version: int) -> str:
        """Store a value over a live one (rotate, import --replace); returns its fingerprint.

        Noted before the store write: a crash between that write and the metadata update
        leaves the new value, which value() must still hand out."""
        fingerprint = self.ctx.fingerprint(value)
        self.ctx.metadata.set_meta(_note(ref), f"{version}:{fingerprint}")
        self.ctx.store.put(ref, value, version)
        return fingerprint

    def _noted(self, meta: SecretMeta) -> tuple[int, str] | None:
        """The (version, fingerprint) a replace killed mid-way was writing past `meta`."""
        note = self.ctx.metadata.get_meta(_note(meta.ref)) or ""
        version, _, fingerprint = note.partition(":")
        if not version.isdigit() or int(version) <= meta.version:
            return None
        return int(version), fingerprint

    def _settle_rotate(self, meta: SecretMeta) -> SecretMeta:
        """Record a replace that was killed after its store write, before noting another."""
        noted = self._noted(meta)
        if noted is None:
            return meta
        try:
            fingerprint = self.ctx.fingerprint(self.ctx.store.get(meta.ref))
        except BrokerError:
            return meta  # unreadable: the rotate under way replaces it anyway
        if not hmac.compare_digest(fingerprint, noted[1]):
            return meta  # killed before its store write: the store still holds `meta`'s value
        self.ctx.metadata.set_value_info(meta.ref, fingerprint, noted[0], rfc3339())
        return self.ctx.metadata.get(meta.ref)

    def remove(self, ref: str) -> SecretMeta:
        ref = self._local(ref)
        with self.ctx.writing():
            meta = self.ctx.metadata.get(ref)
            self.ctx.record("secret.removed", secret_ref=ref, version=meta.version)
            self.ctx.store.delete(ref)
            self.ctx.metadata.delete(ref)
            # A vault file of this incarnation, restored later, must not match the note.
            self.ctx.metadata.delete_meta(_note(ref))
        return meta

    def all(self) -> list[SecretMeta]:
        return self.ctx.metadata.all()

    def inspect(self, ref: str) -> SecretMeta:
        return self.ctx.metadata.get(parse_ref(ref))

    def value(self, ref: str) -> str:
        """The value of a known ref, for exec and the daemon (callers audit the use).

        Only the value the metadata records (its keyed fingerprint) is handed out: a vault
        file restored from an old copy still decrypts, but it holds a retired value."""
        ref = parse_ref(ref)
        meta = self.ctx.metadata.get(ref)  # no metadata is "not found", whatever the store has
        store = self.ctx.store
        value, sealed = store.get_versioned(ref)
        fingerprint = self.ctx.fingerprint(value)
        # An interrupted replace (the store holds a later version, metadata still this one)
        # is not a rollback: accept exactly the value and version it was writing.
        noted = self._noted(meta)
        if hmac.compare_digest(fingerprint, meta.fingerprint):
            version = meta.version
        elif noted is not None and hmac.compare_digest(fingerprint, noted[1]):
            version = noted[0]
        else:
            raise UnlockFailed(f"{store.location(ref)} does not hold the value of @{ref} "
                               "that its metadata records (restored from an old copy, or "
                               f"changed outside secret-broker); rotate @{ref} to fix it")
        if sealed is not None and sealed != version:
            raise UnlockFailed(f"{store.location(ref)} holds version {sealed} of @{ref} but "
                               f"its metadata records version {version} (restored from an old "
                               f"copy); rotate @{ref} to fix it")
        return value

    def touch(self, ref: str) -> None:
        self.ctx.metadata.touch(ref, rfc3339())

    # --- a home's secrets in and out (`export`, `import`) ---------------------------------

    def export_all(self) -> list[ExportedSecret]:
        """Every secret with its value; all are read, then each is audited `secret.exported`."""
        exported = [ExportedSecret(m.ref, m.provider, m.kind, m.version, m.created_at,
                                   m.rotated_at, self.value(m.ref)) for m in self.all()]
        for s in exported:
            self.ctx.record("secret.exported", secret_ref=s.ref, version=s.version)
        return exported

    def import_all(self, entries: Sequence[ExportedSecret], *,
                   replace: bool) -> list[SecretMeta]:
        """Store each secret in this home's backend, audited `secret.imported`.

        Refs that exist are refused, all named and nothing imported, unless `replace`; a
        replaced ref's version moves past its old one, so the daemon drops the old value
        and the leases that carry it.
        """
        _check_entries(entries)  # every entry, before anything is written
        with self.ctx.writing():
            for s in entries:
                twin = self.ctx.metadata.case_twin(s.ref)
                if twin is not None:
                    raise SecretExists(f"{case_twin_message(s.ref, twin)}; nothing was imported")
            # A replace killed after its store write is recorded first, as rotate does: a new
            # note over it would leave the store holding a value neither note nor metadata names.
            old = {s.ref: None if (meta := self.ctx.metadata.find(s.ref)) is None
                   else self._settle_rotate(meta) for s in entries}
            taken = [f"@{ref}" for ref, meta in old.items() if meta is not None]
            if taken and not replace:
                raise SecretExists(f"{', '.join(taken)} already exist(s) here; nothing was "
                                   "imported (pass --replace to overwrite them)")
            imported = []
            for s in entries:
                before = old[s.ref]
                version = s.version if before is None else max(s.version, before.version + 1)
                self.ctx.record("secret.imported", secret_ref=s.ref, provider=s.provider,
                                kind=s.kind, backend=self.ctx.store.name, version=version,
                                outcome="added" if before is None else "replaced")
                if before is None:
                    self.ctx.metadata.delete_meta(_note(s.ref))  # of an earlier incarnation
                    self.ctx.store.put(s.ref, s.value, version)
                    fingerprint = self.ctx.fingerprint(s.value)
                else:
                    fingerprint = self._replace_value(s.ref, s.value, version)
                meta = SecretMeta(s.ref, s.provider, s.kind, self.ctx.store.name, fingerprint,
                                  version, s.created_at, s.rotated_at, None)
                self.ctx.metadata.insert(meta, replace=True)
                imported.append(meta)
        return imported


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
