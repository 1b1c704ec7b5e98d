"""Moving a home: one standard age file holding a manifest and the values.

The payload is plain age, so in an emergency the `age` tool opens it without secret-broker
(`age -d -o export.json FILE`, with the passphrase or `-i IDENTITY`). Inside is one JSON
document, format version 1:

    {"format": "secret-broker-export", "version": 1, "created_at": "<RFC 3339>",
     "secrets": [{"ref", "provider", "kind", "version", "created_at", "rotated_at", "value"}],
     "grants": "<secrets.grants.toml text>" | null,
     "profiles": "<profiles.toml text>" | null}

The age format comes from pyrage (the Rust age implementation), as for team vaults.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyrage

from broker.core.clock import parse_rfc3339, rfc3339
from broker.core.errors import BrokerError, UnlockFailed, UsageError
from broker.core.home import Home, check_private, secret_file_from, write_private
from broker.core.refs import parse_ref
from broker.service.context import Context
from broker.service.secrets import ExportedSecret, Secrets

if TYPE_CHECKING:
    from broker.store.metadata import SecretMeta

FORMAT = "secret-broker-export"
VERSION = 1
AGE_MAGIC = b"age-encryption.org/v1\n"
# An export holds a few hundred small values at most; the cap keeps a mistaken path (a
# disk image) from being decrypted into memory whole.
MAX_EXPORT_BYTES = 64 << 20
_TOP_KEYS = ("format", "version", "created_at", "secrets", "grants", "profiles")
_SECRET_KEYS = ("ref", "provider", "kind", "version", "created_at", "rotated_at", "value")


@dataclass(frozen=True)
class Manifest:
    created_at: str
    secrets: tuple[ExportedSecret, ...]
    grants: str | None = None  # the text of secrets.grants.toml, with --with-grants
    profiles: str | None = None  # the text of profiles.toml, with --with-grants


@dataclass(frozen=True)
class Imported:
    secrets: list[SecretMeta]
    files: list[Path]  # grants and profiles files written
    left_out: list[str]  # carried files not restored (no --with-grants)


# --- the manifest (pure) -------------------------------------------------------------------


def dump_manifest(manifest: Manifest) -> bytes:
    doc = {"format": FORMAT, "version": VERSION, "created_at": manifest.created_at,
           "secrets": [{k: getattr(s, k) for k in _SECRET_KEYS} for s in manifest.secrets],
           "grants": manifest.grants, "profiles": manifest.profiles}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def load_manifest(data: bytes, source: str) -> Manifest:
    """Parse strictly; errors name the entry and key, never a value."""
    def bad(what: str) -> BrokerError:
        return BrokerError(f"{source} is not a valid secret-broker export: {what}")

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise bad("the decrypted payload is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f'"format" must be "{FORMAT}"')
    if doc.get("version") != VERSION:
        raise bad(f"format version {doc.get('version')!r} is not supported (this is {VERSION})")
    _require_keys(doc, _TOP_KEYS, "the document", bad)
    for key in ("grants", "profiles"):
        if doc[key] is not None and not isinstance(doc[key], str):
            raise bad(f'"{key}" must be text or null')
    if not isinstance(doc["created_at"], str) or not isinstance(doc["secrets"], list):
        raise bad('"created_at" must be text and "secrets" a list')
    secrets = tuple(_secret(entry, n, bad) for n, entry in enumerate(doc["secrets"]))
    refs = [s.ref for s in secrets]
    if len(set(refs)) != len(refs):
        raise bad("a ref appears twice")
    return Manifest(doc["created_at"], secrets, doc["grants"], doc["profiles"])


def _require_keys(doc: dict[str, Any], keys: Sequence[str], where: str,
                  bad: Callable[[str], BrokerError]) -> None:
    if set(doc) != set(keys):
        raise bad(f"{where} must have exactly the keys {', '.join(keys)}")


def _secret(entry: Any, n: int, bad: Callable[[str], BrokerError]) -> ExportedSecret:
    where = f"secrets[{n}]"
    if not isinstance(entry, dict):
        raise bad(f"{where} must be an object")
    _require_keys(entry, _SECRET_KEYS, where, bad)
    texts = ("ref", "provider", "kind", "created_at", "value")
    if not all(isinstance(entry[k], str) for k in texts):
        raise bad(f"{where}: {', '.join(texts)} must be text")
    for key in ("created_at", "rotated_at"):
        try:
            parse_rfc3339(entry[key])
        except (AttributeError, ValueError):
            raise bad(f"{where}: {key} must be an RFC 3339 time (or null for rotated_at)") \
                from None
    version = entry["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"{where}: version must be a positive integer")
    try:
        ref = parse_ref(entry["ref"])
    except UsageError:
        raise bad(f"{where}: ref is not a valid secret ref") from None
    return ExportedSecret(ref, entry["provider"], entry["kind"], version, entry["created_at"],
                          entry["rotated_at"], entry["value"])


# --- age, through pyrage ---------------------------------------------------------------------


def parse_recipients(texts: Sequence[str]) -> list[Any]:
    """`age1…` X25519 recipients; a typo is refused before any value is read."""
    recipients = []
    for text in texts:
        try:
            recipients.append(pyrage.x25519.Recipient.from_str(text.strip()))
        except pyrage.RecipientError:
            raise UsageError(f"--to {text!r} is not an age recipient (age1…)") from None
    return recipients


def read_identities(path: Path) -> list[Any]:
    """An age identity file (`age-keygen` output): AGE-SECRET-KEY-1… lines, # comments."""
    check_private(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the identity file {path}: {why}") from None
    identities = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            identities.append(pyrage.x25519.Identity.from_str(line.strip()))
        except pyrage.IdentityError:
            # The line is a private key (or a mistyped one): never quote it.
            raise UsageError(f"{path} line {number} is not an age identity "
                             "(AGE-SECRET-KEY-1…)") from None
    if not identities:
        raise UsageError(f"{path} holds no age identity (AGE-SECRET-KEY-1… line)")
    return identities


def encrypt(payload: bytes, *, recipients: Sequence[Any], passphrase: str | None) -> bytes:
    try:
        if passphrase is not None:
            return bytes(pyrage.passphrase.encrypt(payload, passphrase))
        return bytes(pyrage.encrypt(payload, list(recipients)))
    except pyrage.EncryptError as exc:
        raise BrokerError(f"age encryption failed: {exc}") from None


def is_passphrase_file(blob: bytes) -> bool:
    """Whether an age file is sealed with a passphrase (an scrypt stanza) or to recipients."""
    header = blob.split(b"\n---", 1)[0]
    return any(line.startswith(b"-> scrypt ") for line in header.split(b"\n"))


def decrypt(blob: bytes, source: str, *, identities: Sequence[Any],
            passphrase: str | None) -> bytes:
    try:
        if passphrase is not None:
            return bytes(pyrage.passphrase.decrypt(blob, passphrase))
        return bytes(pyrage.decrypt(blob, list(identities)))
    except pyrage.DecryptError:
        what = "the passphrase is wrong" if passphrase is not None else \
            "the identity is not one it was encrypted to"
        raise UnlockFailed(f"cannot decrypt {source}: {what}, or the file is damaged") from None


def read_passphrase(env: Mapping[str, str], *, confirm: bool) -> str:
    """SECRET_BROKER_EXPORT_PASSPHRASE_FILE, then SECRET_BROKER_EXPORT_PASSPHRASE, else a
    prompt on the terminal (asked twice when `confirm`)."""
    from broker.store.vault import obtain_passphrase

    return obtain_passphrase(
        secret_file_from(env, "SECRET_BROKER_EXPORT_PASSPHRASE_FILE"),
        env.get("SECRET_BROKER_EXPORT_PASSPHRASE"),
        label="export passphrase", confirm=confirm, missing=UsageError(
            "no export passphrase: set SECRET_BROKER_EXPORT_PASSPHRASE_FILE (or "
            "SECRET_BROKER_EXPORT_PASSPHRASE), or run on a terminal to be prompted"))


# --- exporting and importing a home ----------------------------------------------------------


def _carried_files(home: Home) -> dict[str, Path]:
    """What --with-grants carries: manifest key -> the file in a home."""
    return {"grants": home.grants, "profiles": home.profiles}


def export_home(ctx: Context, *, recipients: Sequence[str], passphrase: str | None,
                with_grants: bool) -> tuple[bytes, Manifest]:
    """The encrypted export of every secret (each audited `secret.exported`)."""
    parsed = parse_recipients(recipients)  # refuse a bad recipient before reading values
    carried = {k: p.read_text(encoding="utf-8") for k, p in _carried_files(ctx.home).items()
               if with_grants and p.exists()}
    manifest = Manifest(rfc3339(), tuple(Secrets(ctx).export_all()), carried.get("grants"),
                        carried.get("profiles"))
    return encrypt(dump_manifest(manifest), recipients=parsed, passphrase=passphrase), manifest


def read_export(name: str) -> tuple[bytes, str]:
    """The bytes of an export file, or of stdin for "-"; and what to call it in messages."""
    if name == "-":
        return sys.stdin.buffer.read(MAX_EXPORT_BYTES + 1), "stdin"
    try:
        with open(name, "rb") as fh:
            return fh.read(MAX_EXPORT_BYTES + 1), name
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None


def open_export(blob: bytes, source: str, *, identity: Path | None,
                env: Mapping[str, str]) -> Manifest:
    """Decrypt with the identity, or the export passphrase when the file wants one."""
    if len(blob) > MAX_EXPORT_BYTES:
        raise UsageError(f"{source} is larger than {MAX_EXPORT_BYTES} bytes; not an export")
    if not blob.startswith(AGE_MAGIC):
        raise UsageError(f"{source} is not an age file (a secret-broker export)")
    if is_passphrase_file(blob):
        if identity is not None:
            raise UsageError(f"{source} is sealed with a passphrase, not to a recipient; "
                             "drop --identity")
        payload = decrypt(blob, source, identities=(),
                          passphrase=read_passphrase(env, confirm=False))
    elif identity is None:
        raise UsageError(f"{source} is encrypted to an age recipient; pass --identity FILE")
    else:
        payload = decrypt(blob, source, identities=read_identities(identity), passphrase=None)
    return load_manifest(payload, source)


def _entries(text: str, kind: str, source: str) -> int:
    """How many grants or profiles a text holds (GrantsError / ConfigError if invalid)."""
    if kind == "grants":
        from grants import parse_grants

        return len(parse_grants(text, source))
    from broker.service.profiles import parse_profiles

    return len(parse_profiles(text, source))


def _clashes(path: Path, kind: str, incoming: str) -> bool:
    """Whether a receiving file holds other grants or profiles than the incoming text.

    init's example grants file (all comments) holds none, so it is no clash; a file that
    cannot be read or parsed counts as holding some."""
    from grants import GrantsError

    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    try:
        return current != incoming and _entries(current, kind, str(path)) > 0
    except (GrantsError, BrokerError):
        return True


def import_home(ctx: Context, manifest: Manifest, *, replace: bool,
                with_grants: bool) -> Imported:
    """Store every secret in this home's backend; with `with_grants`, restore the grants and
    profiles files too. Refs and files that exist are refused (all named, nothing imported)
    unless `replace`."""
    targets = _carried_files(ctx.home)
    carried = {k: text for k in targets if (text := getattr(manifest, k)) is not None}
    files = carried if with_grants else {}
    counts = {k: _entries(text, k, f"the export's {targets[k].name}") for k, text in files.items()}
    taken = [str(targets[k]) for k, text in files.items()
             if not replace and _clashes(targets[k], k, text)]
    if taken:
        raise BrokerError(f"{', '.join(taken)} already hold(s) other entries; nothing was "
                          "imported (pass --replace to overwrite, or leave out --with-grants)")
    imported = Secrets(ctx).import_all(manifest.secrets, replace=replace)
    for kind, text in files.items():
        ctx.record(f"{kind}.imported", count=counts[kind])
        write_private(targets[kind], text.encode())
    return Imported(imported, [targets[k] for k in files],
                    [targets[k].name for k in carried if k not in files])
