"""The file vault on disk: unlocking it, and atomic, serialised writes of its files.

The format itself lives in `envelope.py`; this module only does I/O around it.
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from broker.core.errors import BrokerError, NotInitialized, SecretNotFound, UnlockFailed, UsageError
from broker.core.home import Home, check_private, fsync_dir, secret_file_from, write_private
from broker.store import envelope

HEADER = "header.json"


def _file_name(ref: str) -> str:
    # Internal entries ("!name") cannot collide with refs, whose alphabet has no "!".
    return f"i-{ref[1:]}.sbv" if ref.startswith("!") else f"s-{ref}.sbv"


class FileVault:
    """XChaCha20-Poly1305 files under a key already derived and checked."""

    name = "file-vault"

    def __init__(self, directory: Path, key: bytes) -> None:
        self._dir = directory
        self._key = key

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Every vault write holds this lock, so a temp file seen now is one a killed
            # writer left behind (write_private's `.NAME.tmp-RANDOM`, or `.NAME.tmpPID` from
            # older versions): sealed, but clutter.
            for stale in self._dir.glob(".*.sbv.tmp*"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def get(self, ref: str) -> str:
        return self.get_versioned(ref)[0]

    def location(self, ref: str) -> str:
        return str(self._dir / _file_name(ref))

    def get_versioned(self, ref: str) -> tuple[str, int | None]:
        path = self._dir / _file_name(ref)
        check_private(path)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise SecretNotFound(f"no stored value for @{ref} in the file vault") from None
        try:
            version, value = envelope.open_secret(self._key, ref, blob)
        except envelope.EnvelopeError as exc:
            raise UnlockFailed(str(exc)) from None
        return value.decode("utf-8"), version

    def put(self, ref: str, value: str, version: int) -> None:
        blob = envelope.seal_secret(self._key, ref, version, value.encode("utf-8"))
        with self._locked():
            write_private(self._dir / _file_name(ref), blob)

    def delete(self, ref: str) -> None:
        with self._locked():
            try:
                (self._dir / _file_name(ref)).unlink()
            except FileNotFoundError:
                return
            fsync_dir(self._dir)

    def refs(self) -> list[str]:
        """Refs with a stored value (for `check`: values without metadata)."""
        return sorted(p.name[2:-4] for p in self._dir.glob("s-*.sbv"))


# --- creating and unlocking ----------------------------------------------------------------


def create_vault(home: Home, passphrase: bytes | None) -> str:
    """Write the vault header; with no passphrase, generate `vault.key`. Returns how it unlocks."""
    home.vault.mkdir(mode=0o700, exist_ok=True)
    if passphrase is not None:
        kdf = envelope.new_kdf_params()
        header = envelope.make_header(envelope.derive_key(passphrase, kdf), "passphrase", kdf)
    else:
        key = os.urandom(envelope.KEY_BYTES)
        write_private(home.vault_key, base64.urlsafe_b64encode(key) + b"\n")
        header = envelope.make_header(key, "keyfile", None)
    write_private(home.vault / HEADER, envelope.dump_header(header))
    return header.unlock


def open_vault(home: Home, environ: Mapping[str, str] | None = None) -> FileVault:
    env = os.environ if environ is None else environ
    check_private(home.vault)
    check_private(home.vault / HEADER)
    try:
        raw_header = (home.vault / HEADER).read_bytes()
    except FileNotFoundError:
        raise NotInitialized(
            f"no vault header at {home.vault / HEADER}; run `secret-broker init --backend "
            "file-vault`"
        ) from None
    try:
        header = envelope.load_header(raw_header)
    except envelope.EnvelopeError as exc:
        raise UnlockFailed(f"{home.vault / HEADER}: {exc}") from None
    if header.unlock == "keyfile":
        key = read_key_file(home, env)
        what = "the key file"
    else:
        assert header.kdf is not None  # load_header guarantees it for passphrase vaults
        try:
            key = envelope.derive_key(read_passphrase(env), header.kdf)
        except envelope.EnvelopeError as exc:
            raise UnlockFailed(str(exc)) from None
        what = "the passphrase"
    try:
        envelope.check_key(header, key)
    except envelope.EnvelopeError:
        raise UnlockFailed(
            f"cannot unlock the file vault: {what} is wrong, or {home.vault / HEADER} was "
            "tampered with"
        ) from None
    return FileVault(home.vault, key)


def read_key_file(home: Home, env: Mapping[str, str]) -> bytes:
    path = secret_file_from(env, "SECRET_BROKER_KEY_FILE") or home.vault_key
    check_private(path)
    try:
        key = base64.urlsafe_b64decode(path.read_bytes().strip())
    except FileNotFoundError:
        raise UnlockFailed(
            f"the file vault is unlocked by a key file and {path} does not exist; "
            "set SECRET_BROKER_KEY_FILE to its path"
        ) from None
    except (OSError, ValueError):
        raise UnlockFailed(f"{path} is not a valid vault key file") from None
    if len(key) != envelope.KEY_BYTES:
        raise UnlockFailed(f"{path} is not a valid vault key file (wrong length)")
    return key


def passphrase_source(env: Mapping[str, str]) -> Path | str | None:
    """Where a passphrase would come from, in order of preference (files before env)."""
    named = secret_file_from(env, "SECRET_BROKER_PASSPHRASE_FILE")
    if named is not None:
        return named
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "passphrase").exists():
        return Path(creds) / "passphrase"
    if env.get("SECRET_BROKER_PASSPHRASE"):
        return "env"
    return None


def read_passphrase(env: Mapping[str, str], *, confirm: bool = False) -> bytes:
    source = passphrase_source(env)
    return obtain_passphrase(
        source if isinstance(source, Path) else None, env.get("SECRET_BROKER_PASSPHRASE"),
        label="vault passphrase", confirm=confirm, missing=UnlockFailed(
            "the file vault needs its passphrase: set SECRET_BROKER_PASSPHRASE_FILE (or a "
            "systemd credential 'passphrase'), or run on a terminal to be prompted"),
    ).encode("utf-8")


def obtain_passphrase(path: Path | None, value: str | None, *, label: str, confirm: bool,
                      missing: BrokerError) -> str:
    """From a file (one trailing newline dropped), else a value from the environment, else
    a prompt on the terminal (asked twice when `confirm`); `missing` when none is there.
    Failures are raised as `missing`'s class."""
    if path is not None:
        try:
            value = path.read_text(encoding="utf-8").removesuffix("\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise type(missing)(f"cannot read the {label} file {path}: {why}") from None
    elif not value:
        if not sys.stdin.isatty():
            raise missing
        value = getpass.getpass(f"{label.capitalize()}: ")
        if confirm and getpass.getpass(f"Repeat the {label}: ") != value:
            raise UsageError("the two passphrases differ; nothing was done")
    if not value:
        raise type(missing)(f"the {label} is empty")
    return value
