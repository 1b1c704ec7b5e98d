"""Review findings on the home and on `exec`, driven as the accident or the attacker would.

`init` over a home that lost config.toml, passphrase files others can read, a home reached
through a symlink, broker credentials inherited by exec children, and loader variables set
from the store. Every command is the real CLI in a subprocess on a throwaway home.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CANARY, Cli, base_env, grant, scan, start_daemon, write_grants

DUMP_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
PRINT_V = [sys.executable, "-c", "import os; print(os.environ['V'], end='')"]


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under root (the lock files and run/ aside), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock" and p.parts[len(root.parts)] != "run"}


def one_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with `code`, no traceback, stderr naming every needle."""
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("secret-broker: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def secret_execs(cli: Cli) -> list[dict[str, Any]]:
    doc = json.loads(cli.ok("audit", "--json", "--event", "secret.exec"))
    return list(doc["events"])


# --- 1. init over an existing home ----------------------------------------------------------------


def test_init_refuses_a_home_that_lost_its_config(cli: Cli) -> None:
    """config.toml deleted, init run again: refused, every file kept, the secret still reads."""
    cli.add("@a", CANARY)
    config = (cli.home / "config.toml").read_bytes()
    (cli.home / "config.toml").unlink()
    before = files(cli.home)
    err = one_error(cli("init"), 1, "config.toml", "vault.key", "vault/header.json",
                    "broker.token", "audit.log", "metadata.db", 'backend = "file-vault"')
    assert "move" in err
    assert files(cli.home) == before
    one_error(cli("init", "--backend", "file-vault"), 1, "config.toml")
    assert files(cli.home) == before
    private_file(cli.home / "config.toml", config.decode())
    assert cli.ok("exec", "--env", "V=@a", "--", *PRINT_V) == CANARY
    assert "audit log OK" in cli.ok("audit", "verify")
    assert scan([out for out in cli.outputs if out != CANARY], CANARY) == []  # but exec's


def _metadata_rows(home: Path) -> None:
    db = sqlite3.connect(home / "metadata.db")
    with db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('instance_id', 'x')")
    db.close()


LEFTOVERS: list[tuple[str, Callable[[Path], None]]] = [
    ("vault/header.json", lambda h: private_file(h / "vault" / "header.json", "{}")),
    ("vault/s-a.sbv", lambda h: private_file(h / "vault" / "s-a.sbv", "sealed")),
    ("vault.key", lambda h: private_file(h / "vault.key", "a2V5\n")),
    ("audit.log", lambda h: private_file(h / "audit.log", "{}\n")),
    ("broker.token", lambda h: private_file(h / "broker.token", "sbt_x\n")),
    ("metadata.db", _metadata_rows),
]


@pytest.mark.parametrize(("name", "plant"), LEFTOVERS, ids=[n for n, _ in LEFTOVERS])
@pytest.mark.parametrize("backend", ["file-vault", "keychain"])
def test_init_refuses_a_home_holding_any_one_leftover(home: Path, name: str,
                                                      plant: Callable[[Path], None],
                                                      backend: str) -> None:
    """One key, vault, log, token or metadata row is an existing home: init writes nothing."""
    (home / "vault").mkdir(mode=0o700, parents=True)
    plant(home)
    before = files(home)
    cli = Cli(home, base_env(home))
    one_error(cli("init", "--backend", backend), 1, name, "config.toml")
    assert files(home) == before


def test_init_on_an_empty_metadata_db_goes_ahead(home: Path) -> None:
    """An empty metadata.db and vault/ directory hold nothing to lose: init creates the home."""
    (home / "vault").mkdir(mode=0o700, parents=True)
    (home / "metadata.db").touch(mode=0o600)
    cli = Cli(home, base_env(home))
    cli.ok("init", "--backend", "file-vault")
    cli.add("@a", CANARY)
    assert cli.ok("exec", "--env", "V=@a", "--", *PRINT_V) == CANARY


def test_init_with_another_backend_on_an_intact_home_changes_nothing(cli: Cli) -> None:
    """--backend keychain on a file-vault home: refused naming both, every file kept."""
    before = files(cli.home)
    one_error(cli("init", "--backend", "keychain"), 1, "file-vault", "keychain", "export")
    assert files(cli.home) == before
    assert "nothing was changed" in cli.ok("init", "--backend", "file-vault")
    assert files(cli.home) == before


# --- 2. passphrase files others can read ----------------------------------------------------------


def test_loose_passphrase_file_is_refused_by_init(home: Path, tmp_path: Path) -> None:
    """init with a 0644 SECRET_BROKER_PASSPHRASE_FILE: refused naming chmod 600, no home."""
    loose = private_file(tmp_path / "pass", "correct horse battery\n", 0o644)
    cli = Cli(home, base_env(home, SECRET_BROKER_PASSPHRASE_FILE=str(loose)))
    one_error(cli("init", "--backend", "file-vault"), 1, f"chmod 600 {loose}")
    assert not (home / "config.toml").exists()


def test_loose_passphrase_file_is_refused_by_exec_and_start(home: Path, tmp_path: Path) -> None:
    """A passphrase vault, then its file made 0644: exec and start refuse, nothing runs."""
    passfile = private_file(tmp_path / "pass", "correct horse battery\n")
    cli = Cli(home, base_env(home, SECRET_BROKER_PASSPHRASE_FILE=str(passfile)))
    cli.ok("init", "--backend", "file-vault")
    cli.add("@a", CANARY)
    passfile.chmod(0o644)
    marker = tmp_path / "launched"
    one_error(cli("exec", "--env", "V=@a", "--", "touch", str(marker)), 1,
              f"chmod 600 {passfile}")
    assert not marker.exists()
    one_error(cli("start", "--listen", "127.0.0.1:0"), 1, f"chmod 600 {passfile}")
    assert cli("status").returncode == 6
    doc = json.loads(cli("check", "--json").stdout)
    assert any(str(passfile) in f["message"] and "SECRET_BROKER_PASSPHRASE_FILE" in f["message"]
               for f in doc["errors"])


def test_loose_export_passphrase_file_is_refused(cli: Cli, tmp_path: Path) -> None:
    """export and import with a 0644 SECRET_BROKER_EXPORT_PASSPHRASE_FILE: refused, no output."""
    cli.add("@a", CANARY)
    good = private_file(tmp_path / "export-pass", "export passphrase\n")
    out = tmp_path / "home.age"
    cli.ok("export", "--passphrase", "-o", str(out),
           env={"SECRET_BROKER_EXPORT_PASSPHRASE_FILE": str(good)})
    loose = private_file(tmp_path / "loose-pass", "export passphrase\n", 0o644)
    env = {"SECRET_BROKER_EXPORT_PASSPHRASE_FILE": str(loose)}
    again = tmp_path / "again.age"
    one_error(cli("export", "--passphrase", "-o", str(again), env=env), 1, f"chmod 600 {loose}")
    assert not again.exists()
    one_error(cli("import", str(out), "--replace", env=env), 1, f"chmod 600 {loose}")
    assert [e["event"] for e in json.loads(cli.ok("audit", "--json"))["events"]
            ].count("secret.imported") == 0


def test_check_reports_loose_files_named_in_the_environment(cli: Cli, tmp_path: Path) -> None:
    """check names each loose file that an environment variable points at, and the fix."""
    names = ("SECRET_BROKER_PASSPHRASE_FILE", "SECRET_BROKER_EXPORT_PASSPHRASE_FILE",
             "SECRET_BROKER_KEY_FILE", "SECRET_BROKER_TOKEN_FILE")
    env = {n: str(private_file(tmp_path / n.lower(), "x\n", 0o644)) for n in names}
    env["SECRET_BROKER_KEY_FILE"] = str(tmp_path / "key")
    (cli.home / "vault.key").rename(tmp_path / "key")
    (tmp_path / "key").chmod(0o640)
    proc = cli("check", "--json", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = json.loads(proc.stdout)["errors"]
    for name in names:
        (finding,) = [f for f in errors if name in f["message"]]
        assert env[name] in finding["message"] and f"chmod 600 {env[name]}" in finding["fix"]
    cli("check", "--fix", env=env)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o640  # outside the home: kept


# --- 3. a home reached through a symlink ----------------------------------------------------------


def test_check_follows_a_symlinked_home_as_serve_does(cli: Cli, tmp_path: Path) -> None:
    """SECRET_BROKER_HOME is a link to a 0755 home: check errs as serve does; --fix mends it."""
    link = cli.home.parent / "link"
    link.symlink_to(cli.home)
    cli.home.chmod(0o755)
    env = base_env(link)
    via = Cli(link, env)
    serve = subprocess.run([sys.executable, "-m", "broker", "serve", "--listen", "127.0.0.1:0"],
                           env=env, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert serve.returncode == 1 and "chmod 700" in serve.stderr
    doc = json.loads(via("check", "--json").stdout)
    assert any("mode 755" in f["message"] for f in doc["errors"] if f["check"] == "modes")
    via.ok("check", "--fix")
    assert stat.S_IMODE(cli.home.stat().st_mode) == 0o700
    assert json.loads(via.ok("check", "--json"))["errors"] == []
    daemon = start_daemon(cli.home, env)
    try:
        assert daemon.client(unix=True).health()
    finally:
        daemon.stop()


def test_check_judges_a_linked_file_in_the_home_by_its_target(cli: Cli, tmp_path: Path) -> None:
    """broker.token a link to a 0644 file: serve refuses it, check says so, --fix mends it."""
    target = private_file(tmp_path / "token", (cli.home / "broker.token").read_text(), 0o644)
    (cli.home / "broker.token").unlink()
    (cli.home / "broker.token").symlink_to(target)
    serve = subprocess.run([sys.executable, "-m", "broker", "serve", "--listen", "127.0.0.1:0"],
                           env=cli.env, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert serve.returncode == 1 and "broker.token" in serve.stderr
    doc = json.loads(cli("check", "--json").stdout)
    assert [f["fix"] for f in doc["errors"]] == [
        f"chmod 600 {cli.home}/broker.token (or run `secret-broker check --fix`)"]
    cli.ok("check", "--fix")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert (cli.home / "broker.token").is_symlink()


# --- 4. credentials the launcher holds do not reach exec children ---------------------------------


LAUNCHER = {
    "SECRET_BROKER_TOKEN": "sbt_owner-token",
    "SECRET_BROKER_TOKEN_FILE": "/nonexistent/token",
    "SECRET_BROKER_URL": "http://127.0.0.1:1",
    "SECRET_BROKER_EXPORT_PASSPHRASE": "export-pass",
    "SECRET_BROKER_EXPORT_PASSPHRASE_FILE": "/nonexistent/export-pass",
    "SECRET_BROKER_PASSPHRASE_FILE": "/nonexistent/pass",
    "SECRET_BROKER_PASSPHRASE": "vault-pass",
    "CREDENTIALS_DIRECTORY": "/nonexistent/creds",
}


def _broker_vars(env: dict[str, str]) -> set[str]:
    return {k for k in env if k.startswith("SECRET_BROKER_") or k == "CREDENTIALS_DIRECTORY"}


def test_exec_child_gets_no_broker_credentials(cli: Cli) -> None:
    """With the owner's token and passphrases set, the child sees only what it asked for."""
    cli.add("@a", CANARY)
    child = json.loads(cli.ok("exec", "--env", "V=@a", "--env", "SECRET_BROKER_X=@a", "--",
                              *DUMP_ENV, env=LAUNCHER))
    assert _broker_vars(child) == {"SECRET_BROKER_X"}
    assert child["V"] == child["SECRET_BROKER_X"] == CANARY
    assert "PATH" in child  # the rest of the launcher's environment passes


def test_profile_child_gets_no_broker_credentials(cli: Cli) -> None:
    """A plugin launched by profile does not get the owner's token to escape its grants."""
    cli.add("@a", CANARY)
    write_grants(cli.home, grant("a", "plugin", delivery='"env"'))
    private_file(cli.home / "profiles.toml",
                 '[profiles.p]\nconsumer = "plugin"\nenv = { V = "@a" }\n')
    child = json.loads(cli.ok("exec", "--profile", "p", "--", *DUMP_ENV, env=LAUNCHER))
    assert _broker_vars(child) == set() and child["V"] == CANARY


def test_started_daemon_gets_only_what_it_needs(cli: Cli) -> None:
    """`start` hands the daemon its home and unlock settings, not the owner's other secrets."""
    key = cli.home.parent / "key"
    (cli.home / "vault.key").rename(key)
    launcher = {**LAUNCHER, "SECRET_BROKER_KEY_FILE": str(key)}
    del launcher["SECRET_BROKER_PASSPHRASE_FILE"], launcher["SECRET_BROKER_PASSPHRASE"]
    cli.ok("start", "--listen", "127.0.0.1:0", env=launcher)
    try:
        pid = int((cli.home / "run" / "broker.pid").read_text())
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if item)
        assert _broker_vars(env) == {"SECRET_BROKER_HOME", "SECRET_BROKER_KEY_FILE",
                                     "CREDENTIALS_DIRECTORY"}
    finally:
        cli.ok("stop")


# --- 5. loader and interpreter variables ----------------------------------------------------------


DENIED = ["LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "PATH",
          "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "NODE_OPTIONS", "BASH_ENV", "ENV",
          "PERL5OPT", "RUBYOPT", "JAVA_TOOL_OPTIONS", "GCONV_PATH", "IFS", "SHELLOPTS"]


@pytest.mark.parametrize("var", DENIED)
def test_exec_refuses_loader_variables_from_flags_and_files(cli: Cli, tmp_path: Path,
                                                            var: str) -> None:
    """--env, an env-file ref and an env-file plain value: exit 2 naming it, nothing runs."""
    cli.add("@a", CANARY)
    marker = tmp_path / "launched"
    env_ref = private_file(tmp_path / "ref.env", f"OK=@a\n{var}=@a\n")
    env_plain = private_file(tmp_path / "plain.env", f"{var}=/tmp/x\n")
    for how in (["--env", f"{var}=@a"], ["--env-file", str(env_ref)],
                ["--env-file", str(env_plain)]):
        err = one_error(cli("exec", *how, "--", "touch", str(marker)), 2,
                        f"{var} cannot be set")
        assert CANARY not in err
    assert not marker.exists()
    assert secret_execs(cli) == []


@pytest.mark.parametrize("var", ["LD_AUDIT", "NODE_OPTIONS", "BASH_ENV", "PYTHONSTARTUP"])
def test_profiles_refuse_the_same_variables(cli: Cli, tmp_path: Path, var: str) -> None:
    """A profile setting one of them is invalid: nothing launches, check names it too."""
    cli.add("@a", CANARY)
    write_grants(cli.home, grant("a", "plugin", delivery='"env"'))
    private_file(cli.home / "profiles.toml",
                 f'[profiles.p]\nconsumer = "plugin"\nenv = {{ {var} = "@a" }}\n')
    marker = tmp_path / "launched"
    one_error(cli("exec", "--profile", "p", "--", "touch", str(marker)), 1,
              f"{var} cannot be set from a profile")
    assert not marker.exists()
    assert secret_execs(cli) == []
    doc = json.loads(cli("check", "--json").stdout)
    assert any(var in f["message"] for f in doc["errors"] if f["check"] == "profiles")


def test_launcher_path_still_reaches_the_child(cli: Cli) -> None:
    """The deny-list is about what exec sets: the launcher's own PATH passes as before."""
    cli.add("@a", CANARY)
    child = json.loads(cli.ok("exec", "--env", "V=@a", "--", *DUMP_ENV))
    assert child["PATH"] == os.environ["PATH"]
