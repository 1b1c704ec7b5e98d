"""The OS keychain through `keyring`, refusing any backend that is not a real keychain.

`keyring.get_keyring()` honours `KEYRING_PROPERTY`-style configuration and may resolve to a
plaintext or null backend; so we pick the backend ourselves from a short list of real
keychains and check that it answers (keyring's own `core.py` shows how easily the
resolved backend differs from what one expects).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from broker.core.errors import KeychainUnavailable, SecretNotFound, UnlockFailed
from broker.core.home import Home
from broker.store.metadata import read_instance_id

HOME_KEY = "!home"  # the real path of the home these entries belong to

# Backends that keep secrets in an OS-protected store. Anything else (keyrings.alt's
# plaintext files, the null and fail backends, chainers) is refused.
_TRUSTED = {
    "keyring.backends.SecretService.Keyring",
    "keyring.backends.libsecret.Keyring",
    "keyring.backends.macOS.Keyring",
    "keyring.backends.Windows.WinVaultKeyring",
    "keyring.backends.kwallet.DBusKeyring",
}

_FIX = "use `--backend file-vault` (or SECRET_BROKER_BACKEND=file-vault) instead"


def _qualname(backend: Any) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def _native_backends() -> list[Any]:
    """This platform's own keychain, without importing every backend keyring knows
    (`get_all_keyring()` costs ~170 ms, most of `exec`'s time on a keychain home)."""
    import importlib

    name = {"linux": "keyring.backends.SecretService.Keyring",
            "darwin": "keyring.backends.macOS.Keyring",
            "win32": "keyring.backends.Windows.WinVaultKeyring"}.get(sys.platform)
    if name is None:
        return []
    module, _, cls = name.rpartition(".")
    try:
        backend = getattr(importlib.import_module(module), cls)()
        backend.priority  # noqa: B018 - raises when this keychain cannot work here
    except Exception:
        return []
    return [backend]


def find_backend() -> Any:
    """The highest-priority trusted keychain that answers, or KeychainUnavailable."""
    try:
        from keyring.backend import get_all_keyring
        from keyring.errors import KeyringError
    except ImportError as exc:  # pragma: no cover - keyring is a dependency
        raise KeychainUnavailable(f"the keyring library is missing ({exc}); {_FIX}") from None
    candidates = _native_backends() or [b for b in get_all_keyring() if _qualname(b) in _TRUSTED]
    if not candidates:
        raise KeychainUnavailable(f"no usable OS keychain answers on this machine; {_FIX}")
    backend = max(candidates, key=lambda b: b.priority)
    try:
        backend.get_password("secret-broker:probe", "probe")
    except (KeyringError, RuntimeError, OSError) as exc:
        raise KeychainUnavailable(
            f"the OS keychain ({_qualname(backend)}) does not answer ({type(exc).__name__}); {_FIX}"
        ) from None
    return backend


def _same_directory(one: str, two: str) -> bool:
    """Two paths of one directory (a bind mount); False when either is gone."""
    try:
        return os.path.samefile(one, two)
    except OSError:
        return False


class Keychain:
    """Values under service `secret-broker:<instance id>`, username = ref."""

    name = "keychain"

    def __init__(self, instance_id: str, backend: Any | None = None) -> None:
        self._service = f"secret-broker:{instance_id}"
        self._backend = backend if backend is not None else find_backend()

    def _call(self, op: str, *args: str) -> Any:
        from keyring.errors import KeyringError, PasswordDeleteError

        try:
            return getattr(self._backend, op)(self._service, *args)
        except PasswordDeleteError:
            return None  # deleting what is not there leaves the wanted state
        except KeyringError as exc:
            raise KeychainUnavailable(
                f"the OS keychain refused to {op.split('_')[0]} a value "
                f"({type(exc).__name__}); is it locked?"
            ) from None

    def claim(self, home: Home, instance_id: str) -> None:
        """Refuse a copy of the home these entries belong to (`cp -a` copies the instance id,
        so a copy would overwrite and delete the original's values).

        The keychain records the real path of the home that owns the entries. Another path
        is a copy while the recorded one still holds a home with the same instance id;
        otherwise the home was moved or restored from a backup, and takes the entries over.
        """
        here = os.path.realpath(home.root)
        owner = self._call("get_password", HOME_KEY)
        if owner == here:
            return
        if owner is not None and not _same_directory(owner, here) and \
                read_instance_id(Home(Path(owner)).metadata) == instance_id:
            raise UnlockFailed(
                f"{here} is a copy of the keychain home {owner}: both use the same OS keychain "
                "entries, so a change here would change that home's secrets; nothing was done. "
                f"Run `secret-broker export` in {owner} and `secret-broker import` into a new "
                "home made by `secret-broker init`, then delete this copy (or delete "
                f"{owner} if this copy is to replace it)", code="home_copied")
        self._call("set_password", HOME_KEY, here)

    def location(self, ref: str) -> str:
        return f"the OS keychain entry {ref} of {self._service}"

    def get(self, ref: str) -> str:
        value = self._call("get_password", ref)
        if value is None:
            raise SecretNotFound(f"no stored value for @{ref} in the OS keychain")
        return str(value)

    def get_versioned(self, ref: str) -> tuple[str, int | None]:
        return self.get(ref), None  # the keychain keeps no version

    def put(self, ref: str, value: str, version: int) -> None:
        del version  # the keychain keeps one value per name; metadata.db holds the version
        self._call("set_password", ref, value)

    def delete(self, ref: str) -> None:
        self._call("delete_password", ref)
