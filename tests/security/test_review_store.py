"""Stores under review: a copied keychain home, vault files of an earlier incarnation,
imports that fail half way or are killed, refs that differ only in case, oversized values.

The keychain tests run against the real Secret Service: `dbus-run-session --
scripts/with-keyring python -m pytest tests/security/test_review_store.py`.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyrage
import pytest

from broker.core.errors import BrokerError
from broker.core.home import Home
from broker.service.context import Context
from broker.service.secrets import ExportedSecret, Secrets
from tests.conftest import CANARY, Cli, base_env, needs_secret_service, scan
from tests.integration.test_keychain import keychain_homes as keychain_homes  # a fixture
from tests.integration.test_keychain import one_line_error, value_of
from tests.integration.test_store_cli import _spin_until

MAX_VALUE = 64 * 1024


def copy_home(source: Path, target: Path) -> Cli:
    """`cp -a`, as a user backing up or duplicating a home would."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return Cli(target, base_env(target))


# --- 1. a copied keychain home ---------------------------------------------------------------


@needs_secret_service
def test_a_copied_keychain_home_is_refused_and_the_original_is_intact(
        keychain_homes: Any) -> None:
    """rotate, remove and exec in a `cp -a` copy are refused (exit 5, naming the original and
    export/import); the original's value and metadata are untouched."""
    orig: Cli = keychain_homes("orig")
    orig.add("@a", CANARY)
    copy = copy_home(orig.home, orig.home.parent / "copy")
    for args, stdin in ((("rotate", "@a", "--stdin"), "overwritten"), (("remove", "@a"), None),
                        (("exec", "--env", "V=@a", "--", "true"), None)):
        line = one_line_error(copy(*args, input=stdin), 5)
        assert str(copy.home) in line and str(orig.home) in line, line
        assert "secret-broker export" in line and "import" in line, line
    assert value_of(orig, "@a") == CANARY
    assert json.loads(orig.ok("inspect", "@a", "--json"))["version"] == 1
    assert "is a copy of" in copy("check").stdout + copy("check").stderr
    assert scan(copy.outputs, CANARY) == []


@needs_secret_service
def test_a_moved_or_restored_keychain_home_keeps_working(keychain_homes: Any) -> None:
    """`mv` to a new path, and a copy whose original is gone (a restore), are adopted."""
    orig: Cli = keychain_homes("orig")
    orig.add("@a", "v1")
    moved = Cli(orig.home.parent / "moved", base_env(orig.home.parent / "moved"))
    orig.home.rename(moved.home)
    assert value_of(moved, "@a") == "v1"
    moved.ok("rotate", "@a", "--stdin", input="v2")
    restored = copy_home(moved.home, orig.home.parent / "restored")
    shutil.rmtree(moved.home)  # the disk it was on is gone; the backup comes back elsewhere
    assert value_of(restored, "@a") == "v2"
    restored.ok("rotate", "@a", "--stdin", input="v3")
    assert value_of(restored, "@a") == "v3"
    # The restored home is now the original: a copy of it is refused.
    again = copy_home(restored.home, orig.home.parent / "again")
    one_line_error(again("rotate", "@a", "--stdin", input="x"), 5)
    assert value_of(restored, "@a") == "v3"
    shutil.rmtree(again.home)
    restored.home.rename(orig.home)  # where the fixture looks to delete the entries


@needs_secret_service
def test_a_keychain_home_reached_by_a_second_path_is_no_copy(keychain_homes: Any) -> None:
    """The same directory under a bind mount is the same home, not a copy: it works, and so
    does the first path afterwards."""
    orig: Cli = keychain_homes("orig")
    orig.add("@a", "v1")
    mnt = orig.home.parent / "second"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(orig.home), str(mnt)], check=True)  # root, as in CI
    try:
        second = Cli(mnt, base_env(mnt))
        second.ok("rotate", "@a", "--stdin", input="v2")
        assert value_of(second, "@a") == "v2"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert value_of(orig, "@a") == "v2"


# --- 2. a vault file of an earlier incarnation ------------------------------------------------


def test_vault_file_of_a_removed_secret_is_refused_after_add(cli: Cli) -> None:
    """A vault file saved before `remove` and restored over the re-added ref is refused."""
    cli.add("@k", "first")
    cli.ok("rotate", "@k", "--stdin", input="second")
    vault_file = cli.home / "vault" / "s-k.sbv"
    saved = vault_file.read_bytes()
    cli.ok("remove", "@k")
    cli.add("@k", "third")
    vault_file.write_bytes(saved)
    line = one_line_error(cli("exec", "--env", "V=@k", "--", "true"), 5)
    assert str(vault_file) in line and "rotate @k" in line


def test_vault_file_of_an_older_version_with_the_same_value_is_refused(cli: Cli) -> None:
    """The version inside the vault file must be the one metadata records, even when the old
    file holds the current value (rotated away and back)."""
    cli.add("@k", "same")
    vault_file = cli.home / "vault" / "s-k.sbv"
    saved = vault_file.read_bytes()
    cli.ok("rotate", "@k", "--stdin", input="other")
    cli.ok("rotate", "@k", "--stdin", input="same")
    vault_file.write_bytes(saved)
    line = one_line_error(cli("exec", "--env", "V=@k", "--", "true"), 5)
    assert str(vault_file) in line and "version 1" in line and "version 3" in line


# --- 3. import validates everything first; import --replace survives SIGKILL ------------------


def write_export(cli: Cli, name: str, entries: list[dict[str, Any]]) -> tuple[Path, Path]:
    """A hand-made export (age, to a fresh identity): the file and the identity file."""
    identity = pyrage.x25519.Identity.generate()
    key = cli.home.parent / f"{name}.key"
    key.write_text(f"{identity}\n")
    key.chmod(0o600)
    doc = {"format": "secret-broker-export", "version": 1, "created_at": "2026-01-01T00:00:00Z",
           "secrets": [{"ref": "r", "provider": "openai", "kind": "api_key", "version": 1,
                        "created_at": "2026-01-01T00:00:00Z", "rotated_at": None,
                        "value": "v"} | e for e in entries],
           "grants": None, "profiles": None}
    export = cli.home.parent / f"{name}.age"
    export.write_bytes(pyrage.encrypt(json.dumps(doc).encode(), [identity.to_public()]))
    return export, key


@pytest.mark.parametrize("bad", [
    {"version": 2**63}, {"version": 2**62}, {"value": "\ud800"}, {"value": "x" * (MAX_VALUE + 1)},
    {"ref": "A"}, {"ref": "a b"}, {"ref": "a"}, {"provider": "Open AI"},
], ids=["version-2^63", "version-2^62", "lone-surrogate", "too-large", "case-twin",
        "bad-ref", "duplicate", "bad-provider"])
def test_import_with_a_bad_entry_in_the_middle_writes_nothing(cli: Cli,
                                                              bad: dict[str, Any]) -> None:
    """One bad entry: nothing imported, no vault file, no audit event of an import."""
    export, key = write_export(cli, "bad", [{"ref": "a"}, {"ref": "b"} | bad, {"ref": "c"}])
    proc = cli("import", str(export), "--identity", str(key))
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(cli.ok("list", "--json"))["secrets"] == []
    assert sorted(p.name for p in (cli.home / "vault").glob("s-*")) == []
    assert "secret.imported" not in (cli.home / "audit.log").read_text()
    assert "OK" in cli.ok("audit", "verify")


def test_kill9_during_import_replace_leaves_old_or_new(cli: Cli) -> None:
    """SIGKILL at varied points of `import --replace` leaves the old or the new value, readable
    (the imported version jumps past the next one, so the crash note must name it)."""
    cli.add("@k", "v-start")
    rng = random.Random(20261204)  # fixed seed: the same fault points on every run
    exports = [write_export(cli, f"e{i}", [{"ref": "k", "value": f"v-{i}",
                                            "version": 100 * (i + 1)}]) for i in range(12)]
    started = time.monotonic()
    cli.ok("import", str(exports[0][0]), "--identity", str(exports[0][1]), "--replace")
    span = time.monotonic() - started
    vault_file = cli.home / "vault" / "s-k.sbv"
    current, killed_after_write = "v-0", 0
    for i in range(1, 12):
        new, inode = f"v-{i}", vault_file.stat().st_ino
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "import", str(exports[i][0]), "--identity",
             str(exports[i][1]), "--replace"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli.env)

        def written(inode: int = inode) -> bool:
            return vault_file.stat().st_ino != inode

        # Injected fault points: right after the new vault file is renamed in (before
        # metadata.db records it), or anywhere in the command.
        if i % 2:
            _spin_until(written, proc)
        else:
            time.sleep(rng.uniform(0.3, 1.1) * span)
        proc.kill()
        killed_after_write += proc.wait() == -signal.SIGKILL and written()
        got = value_of(cli, "@k")
        assert got in (current, new), f"round {i}: read {got!r}, wanted {current!r}/{new!r}"
        current = got
    assert killed_after_write >= 1
    assert "OK" in cli.ok("audit", "verify")
    cli.ok("rotate", "@k", "--stdin", input="v-final")
    assert value_of(cli, "@k") == "v-final"


def test_an_import_after_an_interrupted_replace_keeps_the_value_readable(cli: Cli) -> None:
    """A replace killed after its store write, then another killed right after its crash note:
    the store still holds the first one's value, which stays readable (the second import
    records the first before it notes its own, as rotate does)."""
    cli.add("@k", "v-start")
    ctx = Context.open(Home(cli.home), cli.env)
    secrets = Secrets(ctx)
    try:
        secrets._replace_value("k", "v-interrupted", 5)  # killed before metadata recorded it

        class Killed(BaseException):
            pass

        def killed(*_args: Any) -> None:
            raise Killed

        ctx.store.put = killed  # type: ignore[method-assign]  # the kill, after the note
        entry = ExportedSecret("k", "openai", "api_key", 9, "2026-01-01T00:00:00.000Z", None,
                               "v-next")
        with pytest.raises(Killed):
            secrets.import_all([entry], replace=True)
    finally:
        ctx.audit_log.close()
        ctx.metadata.close()
    assert value_of(cli, "@k") == "v-interrupted"


# --- 4. refs that differ only in case ---------------------------------------------------------


def test_refs_differing_only_in_case_are_refused(cli: Cli) -> None:
    """@key after @Key is refused (exit 1, naming @Key), by add and import alike; @Key keeps
    its value (a case-insensitive file system would have overwritten it)."""
    cli.add("@Key", "upper")
    line = one_line_error(cli("add", "@key", "--provider", "openai", "--kind", "api_key",
                              "--stdin", input="lower"), 1)
    assert "@Key" in line
    export, key = write_export(cli, "case", [{"ref": "key", "value": "lower"}])
    for extra in ((), ("--replace",)):
        line = one_line_error(cli("import", str(export), "--identity", str(key), *extra), 1)
        assert "@Key" in line
    assert value_of(cli, "@Key") == "upper"
    assert [s["ref"] for s in json.loads(cli.ok("list", "--json"))["secrets"]] == ["Key"]
    assert sorted(p.name for p in (cli.home / "vault").glob("s-*")) == ["s-Key.sbv"]


# --- 5. a size limit on values ----------------------------------------------------------------


def test_values_over_64_kib_are_refused_by_add_and_rotate(cli: Cli) -> None:
    """64 KiB fits; one byte more is exit 2 naming the limit, for add and rotate."""
    cli.add("@big", "x" * MAX_VALUE)
    too_big = "é" * (MAX_VALUE // 2) + "x"  # 64 KiB + 1 in UTF-8, fewer characters
    line = one_line_error(cli("add", "@k", "--provider", "openai", "--kind", "api_key",
                              "--stdin", input=too_big), 2)
    assert "64 KiB" in line
    line = one_line_error(cli("rotate", "@big", "--stdin", input=too_big), 2)
    assert "64 KiB" in line
    assert json.loads(cli.ok("inspect", "@big", "--json"))["version"] == 1
    assert len(value_of(cli, "@big")) == MAX_VALUE


def test_values_over_64_kib_are_refused_by_the_admin_api(cli: Cli, daemon_factory: Any) -> None:
    """POST and PUT of an oversized value: 400 naming the limit; nothing stored."""
    cli.add("@k", "v")
    client = daemon_factory().client()
    for method, path, body in (
            ("POST", "/v1/admin/secrets", {"ref": "n", "provider": "openai", "kind": "api_key",
                                           "value": "x" * (MAX_VALUE + 1)}),
            ("PUT", "/v1/admin/secrets/k", {"value": "x" * (MAX_VALUE + 1)})):
        with pytest.raises(BrokerError) as exc:
            client.request(method, path, body)
        assert exc.value.status == 400 and "64 KiB" in exc.value.message
    assert [(s["ref"], s["version"]) for s in json.loads(cli.ok("list", "--json"))["secrets"]] \
        == [("k", 1)]


def test_a_value_at_the_limit_fits_through_the_admin_api(cli: Cli, daemon_factory: Any) -> None:
    """The JSON body limit of the secrets routes leaves room for the largest value, even
    written with every character escaped: 64 KiB is stored, not refused as a large body."""
    client = daemon_factory().client()
    client.request("POST", "/v1/admin/secrets", {"ref": "n", "provider": "openai",
                                                 "kind": "api_key", "value": "x" * MAX_VALUE})
    client.request("PUT", "/v1/admin/secrets/n", {"value": "\x01" * MAX_VALUE})
    assert [(s["ref"], s["version"]) for s in json.loads(cli.ok("list", "--json"))["secrets"]] \
        == [("n", 2)]
