"""`secret-broker check` through the real CLI: each planted problem is found, with its fix."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CANARY, Cli, base_env, grant, scan, write_grants

LONG_AGO = "2020-01-01T00:00:00.000Z"


def check(cli: Cli, *args: str, code: int = 0, **kw: Any) -> dict[str, list[dict[str, str]]]:
    """`check --json`, asserting its exit code; the findings by severity."""
    proc = cli("check", "--json", *args, **kw)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    doc: dict[str, list[dict[str, str]]] = json.loads(proc.stdout)
    assert set(doc) == {"errors", "warnings"}
    for finding in doc["errors"] + doc["warnings"]:
        assert set(finding) == {"check", "message", "fix"} and finding["fix"]
    return doc


def found(doc: dict[str, list[dict[str, str]]], severity: str, name: str) -> list[str]:
    return [f["message"] for f in doc[severity] if f["check"] == name]


def sql(home: Path, statement: str, *params: str) -> None:
    db = sqlite3.connect(home / "metadata.db")
    try:
        with db:
            db.execute(statement, params)
    finally:
        db.close()


@pytest.fixture
def healthy(cli: Cli) -> Cli:
    """A home with one secret, a grant for it, and nothing wrong but a stopped daemon."""
    cli.add("@openai_api_key", CANARY)
    write_grants(cli.home, grant("openai_api_key"))
    return cli


def test_a_healthy_home_has_no_findings_but_the_stopped_daemon(healthy: Cli) -> None:
    """A fresh home: no errors, one warning (the daemon is not running), exit 0."""
    doc = check(healthy)
    assert doc == {"errors": [], "warnings": [{
        "check": "daemon", "message": "the broker is not running",
        "fix": "`secret-broker start`"}]}
    assert scan(healthy.outputs, CANARY) == []


def test_a_running_daemon_of_this_version_is_no_finding(healthy: Cli, daemon_factory: Any
                                                        ) -> None:
    """With the daemon answering (same version), check has nothing to say."""
    daemon_factory()
    assert check(healthy) == {"errors": [], "warnings": []}


def loose_config(home: Path) -> None:
    (home / "config.toml").chmod(0o644)


def orphan_grant(home: Path) -> None:
    write_grants(home, grant("openai_api_key") + grant("ghost_key"))


def purpose_typo(home: Path) -> None:
    write_grants(home, grant("openai_api_key", purposes='"llm.chat", "embeddings"'))


def unrotated(home: Path) -> None:
    sql(home, "UPDATE secrets SET created_at = ?, rotated_at = NULL", LONG_AGO)


def missing_value(home: Path) -> None:
    (home / "vault" / "s-openai_api_key.sbv").unlink()


def broken_chain(home: Path) -> None:
    lines = (home / "audit.log").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"secret.added"', b'"secret.bdded"')
    (home / "audit.log").write_bytes(b"\n".join(lines))


def bad_config(home: Path) -> None:
    with (home / "config.toml").open("a") as fh:
        fh.write("\n[check]\nrotate_after_dayz = 3\n")


def bad_grants(home: Path) -> None:
    write_grants(home, grant("openai_api_key").replace("ttl_secs = 300", "ttl_secs = 0"))


def bad_profiles(home: Path) -> None:
    (home / "profiles.toml").write_text('[profiles.p]\nconsumer = "c"\nenv = { PATH = "@x" }\n')
    (home / "profiles.toml").chmod(0o600)


def unused_token(home: Path) -> None:
    sql(home, "UPDATE tokens SET created_at = ?", LONG_AGO)


def expired_token(home: Path) -> None:
    sql(home, "UPDATE tokens SET expires_at = ?", LONG_AGO)


PLANTS: list[tuple[Callable[[Path], None], str, str, str]] = [
    (loose_config, "errors", "modes", "config.toml is accessible by group or others (mode 644)"),
    (broken_chain, "errors", "audit", "is broken at line 2: MAC mismatch"),
    (bad_config, "errors", "config", "unknown key 'rotate_after_dayz' in [check]"),
    (bad_grants, "errors", "grants", "ttl_secs"),
    (bad_profiles, "errors", "profiles", "PATH cannot be set from a profile"),
    (orphan_grant, "warnings", "grants", "grant 1 (line 9) names @ghost_key, which is not stored"),
    (purpose_typo, "warnings", "grants", 'purpose "embeddings", which no gateway route uses'),
    (unrotated, "warnings", "rotation", "@openai_api_key was last set"),
    (missing_value, "warnings", "values", "@openai_api_key has metadata but no stored value"),
    (unused_token, "warnings", "tokens", "has not been used in 30 days"),
    (expired_token, "warnings", "tokens", f"expired at {LONG_AGO}"),
]


@pytest.mark.parametrize(("plant", "severity", "name", "needle"), PLANTS,
                         ids=[p[0].__name__ for p in PLANTS])
def test_check_finds_each_planted_problem(healthy: Cli, plant: Callable[[Path], None],
                                          severity: str, name: str, needle: str) -> None:
    """Each planted problem is reported under its check and severity; errors exit 1."""
    healthy.ok("token", "create", "--consumer", "agent")
    fresh = check(healthy)
    assert fresh["errors"] == [] and [f["check"] for f in fresh["warnings"]] == ["daemon"]
    plant(healthy.home)
    doc = check(healthy, code=1 if severity == "errors" else 0)
    messages = found(doc, severity, name)
    assert any(needle in m for m in messages), doc
    other = "warnings" if severity == "errors" else "errors"
    assert found(doc, other, name) == []


def test_rotate_after_days_comes_from_config(healthy: Cli) -> None:
    """[check] rotate_after_days in config.toml moves the limit."""
    unrotated(healthy.home)
    assert found(check(healthy), "warnings", "rotation")
    with (healthy.home / "config.toml").open("a") as fh:
        fh.write("\n[check]\nrotate_after_days = 100000\n")
    assert found(check(healthy), "warnings", "rotation") == []


def test_weak_kdf_header_is_an_error_not_a_crash(home: Path) -> None:
    """A header whose Argon2 memory is below the floor is reported (it cannot be unlocked,
    so the checks that need the store say why they were skipped)."""
    secret = home.parent / "passphrase"
    secret.write_text("a long passphrase\n")
    secret.chmod(0o600)
    cli = Cli(home, base_env(home, SECRET_BROKER_PASSPHRASE_FILE=str(secret)))
    cli.ok("init", "--backend", "file-vault")
    cli.add("@a", CANARY)
    header = home / "vault" / "header.json"
    doc = json.loads(header.read_text())
    doc["kdf"]["m"] = 1024
    header.write_text(json.dumps(doc))
    result = check(cli, code=1)
    assert found(result, "errors", "kdf") == [
        f"{header}: vault header: KDF parameter m=1024 is outside 65536..1048576 "
        "(tampered or too weak)"]
    skipped = found(result, "warnings", "audit") + found(result, "warnings", "values")
    assert len(skipped) == 2 and all(m.startswith("not checked: ") for m in skipped)


def test_fix_repairs_modes_only(healthy: Cli) -> None:
    """--fix takes group and other bits off every file and directory, and nothing else."""
    home = healthy.home
    unrotated(home)
    for path, mode in ((home, 0o755), (home / "vault", 0o750), (home / "config.toml", 0o644),
                       (home / "audit.log", 0o640), (home / "vault" / "header.json", 0o604)):
        path.chmod(mode)
    text = healthy("check")
    assert text.returncode == 1
    assert f"error: modes: {home}/config.toml is accessible by group or others (mode 644)\n" \
           f"    fix: chmod 600 {home}/config.toml" in text.stdout
    assert "warning: audit: not checked:" in text.stdout  # the loose log is refused
    proc = healthy("check", "--fix")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"fixed: chmod 700 {home}\n" in proc.stderr
    assert f"fixed: chmod 600 {home}/config.toml\n" in proc.stderr
    for path in (home, home / "vault"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in (home / "config.toml", home / "audit.log", home / "vault" / "header.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert found(check(healthy), "warnings", "rotation")  # not a mode: left as it was
