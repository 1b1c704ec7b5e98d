"""broker.store.vault in a temp dir, no daemon: create, unlock, write, read, lock, refuse."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from broker.core.errors import InsecureFile, NotInitialized, SecretNotFound, UnlockFailed
from broker.core.home import Home
from broker.store import vault
from broker.store.vault import FileVault, create_vault, open_vault


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """A home holding a vault unlocked by a generated key file."""
    h = Home(tmp_path / "h")
    h.root.mkdir(mode=0o700)
    assert create_vault(h, None) == "keyfile"
    return h


@pytest.fixture
def opened(home: Home) -> FileVault:
    """The key-file vault, unlocked."""
    return open_vault(home, {})


def test_values_round_trip_with_their_version(opened: FileVault, home: Home) -> None:
    """put then get gives the value and the version sealed with it; files are 0600."""
    opened.put("a", "välue\nwith lines", 3)
    assert opened.get_versioned("a") == ("välue\nwith lines", 3)
    opened.put("a", "newer", 4)
    assert opened.get("a") == "newer"
    path = Path(opened.location("a"))
    assert path.parent == home.vault and oct(path.stat().st_mode & 0o777) == "0o600"
    assert b"newer" not in path.read_bytes()


def test_missing_and_deleted_values(opened: FileVault) -> None:
    """A missing ref is SecretNotFound; deleting it is harmless; refs lists what is stored."""
    with pytest.raises(SecretNotFound, match="@nope"):
        opened.get("nope")
    opened.put("a", "1", 1)
    opened.put("!internal", "x", 1)
    assert opened.refs() == ["a"]  # internal entries are not secrets
    opened.delete("a")
    opened.delete("a")
    assert opened.refs() == []


def test_a_file_moved_to_another_ref_is_refused(opened: FileVault) -> None:
    """Each file is bound to its ref: a copy under another name fails to open."""
    opened.put("a", "value-a", 1)
    opened.put("b", "value-b", 1)
    Path(opened.location("b")).write_bytes(Path(opened.location("a")).read_bytes())
    with pytest.raises(UnlockFailed):
        opened.get("b")


def test_writes_hold_the_lock_and_clear_stale_temp_files(opened: FileVault, home: Home,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write runs under the vault's exclusive lock; a killed writer's temp file goes."""
    stale = home.vault / ".s-a.sbv.tmp-dead"
    stale.write_bytes(b"sealed leftovers")
    held: list[bool] = []
    real_write = vault.write_private

    def probe(path: Path, data: bytes) -> None:
        fd = os.open(home.vault / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real_write(path, data)

    monkeypatch.setattr(vault, "write_private", probe)
    opened.put("a", "1", 1)
    assert held == [True]
    assert not stale.exists()


def test_wrong_or_missing_key_file_is_unlock_failed(home: Home, tmp_path: Path) -> None:
    """Another vault's key, a missing key file, or a bad one: UnlockFailed naming the file."""
    other = Home(tmp_path / "other")
    other.root.mkdir(mode=0o700)
    create_vault(other, None)
    with pytest.raises(UnlockFailed, match="key file is wrong"):
        open_vault(home, {"SECRET_BROKER_KEY_FILE": str(other.vault_key)})
    home.vault_key.unlink()
    with pytest.raises(UnlockFailed, match="SECRET_BROKER_KEY_FILE"):
        open_vault(home, {})
    home.vault_key.write_bytes(b"short\n")
    home.vault_key.chmod(0o600)
    with pytest.raises(UnlockFailed, match="not a valid vault key file"):
        open_vault(home, {})


def test_no_header_and_open_modes_are_refused(home: Home, tmp_path: Path) -> None:
    """No header: NotInitialized naming `init`; a group-readable key file: InsecureFile."""
    with pytest.raises(NotInitialized, match="secret-broker init"):
        open_vault(Home(tmp_path), {})
    home.vault_key.chmod(0o640)
    with pytest.raises(InsecureFile, match="chmod 600"):
        open_vault(home, {})


def test_passphrase_vault(tmp_path: Path) -> None:
    """A passphrase vault opens with its passphrase only; without one it says how to give it."""
    h = Home(tmp_path / "p")
    h.root.mkdir(mode=0o700)
    assert create_vault(h, b"correct horse") == "passphrase"
    assert not h.vault_key.exists()
    open_vault(h, {"SECRET_BROKER_PASSPHRASE": "correct horse"}).put("a", "v", 1)
    assert open_vault(h, {"SECRET_BROKER_PASSPHRASE": "correct horse"}).get("a") == "v"
    with pytest.raises(UnlockFailed, match="passphrase is wrong"):
        open_vault(h, {"SECRET_BROKER_PASSPHRASE": "wrong"})
    with pytest.raises(UnlockFailed, match="SECRET_BROKER_PASSPHRASE_FILE"):
        open_vault(h, {})
