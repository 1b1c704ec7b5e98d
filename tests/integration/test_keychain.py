"""The keychain backend through the real CLI, against a real Secret Service (gnome-keyring).

Run inside `dbus-run-session -- scripts/with-keyring pytest …` (scripts/test does). The tests
that prove what happens with no Secret Service point D-Bus nowhere and need no session.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.store.keychain import HOME_KEY
from tests.conftest import CANARY, CANARY_2, Cli, base_env, needs_secret_service, scan

NO_BUS = {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/bus"}
PRINT_V = ["sh", "-c", 'printf %s "$V"']



def instance_id(home: Path) -> str:
    db = sqlite3.connect(home / "metadata.db")
    try:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    finally:
        db.close()
    return str(value)


def secret_service() -> Any:
    """The keyring backend the broker uses, opened in this process to look behind the CLI."""
    from broker.store.keychain import find_backend

    return find_backend()


def value_of(cli: Cli, ref: str) -> str:
    return cli.ok("exec", "--env", f"V={ref}", "--", *PRINT_V)


def both(fn: Callable[[Any], Any], one: Any, two: Any) -> tuple[Any, Any]:
    """Run the same step for two homes at once (independent homes, so no ordering)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        a, b = pool.map(fn, (one, two))
    return a, b


@pytest.fixture
def keychain_homes(tmp_path: Path) -> Iterator[Any]:
    """Factory of keychain homes; their Secret Service entries are deleted afterwards."""
    made: list[Path] = []

    def make(name: str) -> Cli:
        home = Path(f"{tmp_path}/{name}")
        c = Cli(home, base_env(home))
        out = c.ok("init", "--backend", "keychain")
        assert "backend: keychain (--backend asked for the OS keychain)" in out
        made.append(home)
        return c

    yield make
    backend = secret_service()
    for home in made:
        service = f"secret-broker:{instance_id(home)}"
        db = sqlite3.connect(home / "metadata.db")
        refs = [r for (r,) in db.execute("SELECT ref FROM secrets")]
        db.close()
        for ref in [*refs, "!instance-key", HOME_KEY]:
            with contextlib.suppress(Exception):
                backend.delete_password(service, ref)


@pytest.fixture
def kc(keychain_homes: Any) -> Cli:
    """A CLI on a fresh keychain home."""
    cli: Cli = keychain_homes("kc")
    return cli


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- with a Secret Service ------------------------------------------------------------------------


@needs_secret_service
def test_keychain_round_trip(kc: Cli) -> None:
    """add, list, inspect, rotate, exec and remove; the value lives in the Secret Service."""
    service = f"secret-broker:{instance_id(kc.home)}"
    kc.add("@openai_api_key", CANARY)
    listed = json.loads(kc.ok("list", "--json"))["secrets"]
    assert [(s["ref"], s["backend"], s["version"]) for s in listed] == [
        ("openai_api_key", "keychain", 1)]
    first = json.loads(kc.ok("inspect", "@openai_api_key", "--json"))
    assert secret_service().get_password(service, "openai_api_key") == CANARY
    assert value_of(kc, "@openai_api_key") == CANARY

    assert "version 2" in kc.ok("rotate", "@openai_api_key", "--stdin", input=CANARY_2 + "\n")
    second = json.loads(kc.ok("inspect", "@openai_api_key", "--json"))
    assert second["version"] == 2 and second["fingerprint"] != first["fingerprint"]
    assert secret_service().get_password(service, "openai_api_key") == CANARY_2
    assert value_of(kc, "@openai_api_key") == CANARY_2

    kc.ok("remove", "@openai_api_key")
    assert json.loads(kc.ok("list", "--json")) == {"secrets": []}
    assert secret_service().get_password(service, "openai_api_key") is None
    proc = kc("exec", "--env", "V=@openai_api_key", "--", "true")
    assert "@openai_api_key" in one_line_error(proc, 3)


@needs_secret_service
def test_keychain_home_holds_no_value(kc: Cli) -> None:
    """With the keychain backend no file in the home (nor any output) holds the value."""
    kc.add("@a", CANARY)
    for args in (("list",), ("inspect", "@a", "--json"), ("audit", "--json"),
                 ("exec", "--env", "V=@a", "--", "true")):
        kc.ok(*args)
    assert "OK" in kc.ok("audit", "verify")
    assert not (kc.home / "vault").exists() and not (kc.home / "vault.key").exists()
    assert scan(kc.outputs, CANARY) == []
    for path in kc.home.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


@needs_secret_service
def test_two_homes_never_collide(keychain_homes: Any) -> None:
    """The same ref in two homes keeps two values; rotating or removing one leaves the other."""
    one, two = both(keychain_homes, "one", "two")
    assert instance_id(one.home) != instance_id(two.home)
    both(lambda c: c.add("@shared", f"value-{c.home.name}"), one, two)
    shared = functools.partial(value_of, ref="@shared")
    assert both(shared, one, two) == ("value-one", "value-two")
    one.ok("rotate", "@shared", "--stdin", input="value-one-b")
    assert both(shared, one, two) == ("value-one-b", "value-two")
    one.ok("remove", "@shared")
    assert value_of(two, "@shared") == "value-two"
    assert json.loads(two.ok("inspect", "@shared", "--json"))["version"] == 1


@needs_secret_service
def test_init_picks_keychain_when_one_answers(home: Path) -> None:
    """With no --backend and a Secret Service answering, init picks the keychain and says why."""
    c = Cli(home, base_env(home))
    try:
        out = c.ok("init")
        assert "backend: keychain (an OS keychain answers on this machine)" in out
        assert 'backend = "keychain"' in (home / "config.toml").read_text()
    finally:
        for name in ("!instance-key", HOME_KEY):
            with contextlib.suppress(Exception):
                secret_service().delete_password(f"secret-broker:{instance_id(home)}", name)


@needs_secret_service
def test_keychain_home_loses_its_secret_service(kc: Cli) -> None:
    """A keychain home run where no Secret Service answers fails with exit 5, one line."""
    kc.add("@a", "v")
    line = one_line_error(kc("exec", "--env", "V=@a", "--", "true", env=NO_BUS), 5)
    assert "--backend file-vault" in line
    assert value_of(kc, "@a") == "v"


# --- without a Secret Service ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_init_keychain_without_secret_service(home: Path, how: str) -> None:
    """Asking for the keychain where none answers: exit 5, one line naming the fix, no home."""
    c = Cli(home, base_env(home, **NO_BUS))
    if how == "flag":
        proc = c("init", "--backend", "keychain")
    else:
        proc = c("init", env={"SECRET_BROKER_BACKEND": "keychain"})
    line = one_line_error(proc, 5)
    assert "--backend file-vault" in line
    assert not home.exists()


def test_init_without_keychain_picks_file_vault_and_says_why(home: Path) -> None:
    """No backend named and no keychain: init picks the file vault (key file) and says why."""
    c = Cli(home, base_env(home, **NO_BUS))
    out = c.ok("init")
    assert "backend: file-vault (no OS keychain answers here" in out
    assert "unlocked by a generated key file" in out
    assert "It does not protect against anyone who can read this home" in out
    assert 'backend = "file-vault"' in (home / "config.toml").read_text()
    c.add("@a", "v")
    assert value_of(c, "@a") == "v"


def test_unknown_backend_is_a_usage_error(home: Path) -> None:
    """SECRET_BROKER_BACKEND naming no backend is exit 2 and creates nothing."""
    c = Cli(home, base_env(home, SECRET_BROKER_BACKEND="plaintext"))
    assert "unknown backend 'plaintext'" in one_line_error(c("init"), 2)
    assert not home.exists()
