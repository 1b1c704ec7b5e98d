"""The one contract every backend keeps, and which backend a home uses."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from broker.core.errors import KeychainUnavailable, UsageError
from broker.core.home import Home

KINDS = ("api_key", "token", "password", "certificate", "other")
BACKENDS = ("keychain", "file-vault")


class SecretStore(Protocol):
    """Values by ref. Names starting with "!" are the broker's own internal entries."""

    name: str

    def get(self, ref: str) -> str: ...
    def get_versioned(self, ref: str) -> tuple[str, int | None]:
        """The value and the version sealed with it (None where the store keeps none)."""
    def location(self, ref: str) -> str:
        """Where the value is kept, for messages (a file, a keychain entry)."""
    def put(self, ref: str, value: str, version: int) -> None: ...
    def delete(self, ref: str) -> None: ...


def open_store(home: Home, backend: str, instance_id: str,
               environ: Mapping[str, str] | None = None) -> SecretStore:
    if backend == "keychain":
        from broker.store.keychain import Keychain

        keychain = Keychain(instance_id)
        keychain.claim(home, instance_id)
        return keychain
    from broker.store.vault import open_vault

    return open_vault(home, environ)


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    why: str
    passphrase: bytes | None = None  # file vault only; None means a generated key file


def choose_backend(requested: str | None,
                   environ: Mapping[str, str] | None = None) -> BackendChoice:
    """The named backend; else a keychain that answers; else the file vault."""
    from broker.store.vault import passphrase_source, read_passphrase

    env = os.environ if environ is None else environ
    named = requested or env.get("SECRET_BROKER_BACKEND")
    source = "--backend" if requested else "SECRET_BROKER_BACKEND"
    if named is not None and named not in BACKENDS:
        raise UsageError(f"unknown backend {named!r}: use keychain or file-vault")

    def vault(why: str) -> BackendChoice:
        if passphrase_source(env) is not None or sys.stdin.isatty():
            return BackendChoice("file-vault", why + "; unlocked by a passphrase",
                                 read_passphrase(env, confirm=True))
        return BackendChoice("file-vault", why + "; no passphrase was given and there is no "
                             "terminal, so it is unlocked by a generated key file")

    if named == "keychain":
        from broker.store.keychain import find_backend

        find_backend()  # raises KeychainUnavailable naming --backend file-vault
        return BackendChoice("keychain", f"{source} asked for the OS keychain")
    if named == "file-vault":
        return vault(f"{source} asked for the file vault")
    try:
        from broker.store.keychain import find_backend

        find_backend()
    except KeychainUnavailable:
        return vault("no OS keychain answers here, so the encrypted file vault is used")
    return BackendChoice("keychain", "an OS keychain answers on this machine")
