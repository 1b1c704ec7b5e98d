"""One contract, every backend: the file vault (key file, passphrase) and the OS keychain (a
real Secret Service: run inside `dbus-run-session -- scripts/with-keyring`, as scripts/test
does) take the same operations and give the same results and the same errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.core.errors import SecretNotFound
from broker.core.home import Home
from broker.store.backend import SecretStore, open_store
from broker.store.keychain import HOME_KEY
from broker.store.vault import create_vault

BACKENDS = ("vault-keyfile", "vault-passphrase", "keychain")
PASSPHRASE = "contract passphrase"


@dataclass
class Opened:
    """A store and how to open the same store again (a second process would)."""

    kind: str
    home: Home
    instance_id: str

    def open(self) -> SecretStore:
        backend = "keychain" if self.kind == "keychain" else "file-vault"
        env = {"SECRET_BROKER_PASSPHRASE": PASSPHRASE} if self.kind == "vault-passphrase" else {}
        return open_store(self.home, backend, self.instance_id, env)


def make(kind: str, root: Path) -> Opened:
    """A fresh home of this kind, its store created."""
    home = Home(root)
    home.root.mkdir(mode=0o700)
    if kind != "keychain":
        create_vault(home, PASSPHRASE.encode() if kind == "vault-passphrase" else None)
    return Opened(kind, home, uuid.uuid4().hex)


@pytest.fixture(params=BACKENDS)
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opened]:
    """Each backend in turn, in its own home; keychain entries are removed afterwards."""
    if request.param == "keychain":
        request.getfixturevalue("session_bus")
    made = make(request.param, tmp_path / "h")
    yield made
    if made.kind == "keychain":
        store = made.open()
        for ref in ("a", "b", "!a", HOME_KEY):
            store.delete(ref)


def test_values_round_trip_and_the_newest_wins(opened: Opened) -> None:
    """put then get, in this store and a freshly opened one; a second put replaces."""
    store = opened.open()
    value = "välue with\nnewlines, quotes \" ' and tabs\t" + "x" * 20_000
    store.put("a", value, 1)
    assert store.get("a") == value
    store.put("a", "newer", 2)
    again = opened.open()
    assert again.get("a") == "newer"
    kept_version = again.get_versioned("a")[1]
    assert kept_version == (None if opened.kind == "keychain" else 2)


def test_refs_and_internal_entries_do_not_mix(opened: Opened) -> None:
    """`a`, `b` and the internal `!a` are three separate values."""
    store = opened.open()
    store.put("a", "1", 1)
    store.put("b", "2", 1)
    store.put("!a", "internal", 1)
    assert (store.get("a"), store.get("b"), store.get("!a")) == ("1", "2", "internal")
    store.delete("!a")
    assert store.get("a") == "1"


def test_missing_values_are_secret_not_found(opened: Opened) -> None:
    """A value never stored, or deleted, is SecretNotFound naming the ref; a second delete
    is harmless."""
    store = opened.open()
    with pytest.raises(SecretNotFound, match="@a "):
        store.get("a")
    store.put("a", "1", 1)
    store.delete("a")
    store.delete("a")
    with pytest.raises(SecretNotFound, match="@a "):
        opened.open().get_versioned("a")


def test_location_names_the_ref_never_the_value(opened: Opened) -> None:
    """Where a value lives, for messages: it names the ref and holds no value."""
    store = opened.open()
    store.put("a", "the-value", 1)
    where = store.location("a")
    assert "a" in where and "the-value" not in where


def test_two_homes_never_share_values(opened: Opened, tmp_path: Path) -> None:
    """Another home of the same backend sees none of this home's values."""
    store = opened.open()
    store.put("a", "mine", 1)
    other = make(opened.kind, tmp_path / "other")
    try:
        with pytest.raises(SecretNotFound):
            other.open().get("a")
    finally:
        if other.kind == "keychain":
            other.open().delete(HOME_KEY)
