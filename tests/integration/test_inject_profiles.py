"""SPEC §13 as a user runs it: `inject` templates, `exec --env-file` and `exec --profile`.

Every command is the real CLI in a subprocess on a fresh home; values are canaries, so any
output or audit line that carries one is caught.
"""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from grants import parse_grants
from tests.conftest import CANARY, CANARY_2, Cli, grant, scan, write_grants

BRAVE = "brv-{{ @openai_api_key }}-" + uuid.uuid4().hex  # a value that looks like a template
OPENAI = "sk-svc-" + uuid.uuid4().hex
JINA = "jina-" + uuid.uuid4().hex
VALUES = (CANARY, CANARY_2, BRAVE, OPENAI, JINA)

FORMATION = """\
# formation.afs: a MUXI-style formation; secrets come from secret-broker at deploy time
schema: "1.0.0"
id: research-assistant
llm:
  api_keys:
    openai: "${{ secrets.OPENAI_API_KEY }}"
    anthropic: "${{secrets.ANTHROPIC_API_KEY}}"
  models:
    - text: "openai/gpt-4o"
mcp:
  servers:
    - id: web-search
      command: npx
      args: ["-y", "@modelcontextprotocol/server-brave-search"]
      env:
        BRAVE_API_KEY: "${{ secrets.BRAVE_API_KEY }}"
        FALLBACK_KEY: "${{ secrets.OPENAI_API_KEY }}"
"""

SERVICE_CONFIG = """\
[openai]\r
api_key = "{{ @openai_api_key }}"\r
base_url = "http://127.0.0.1:28443/proxy/openai/v1"\r
"""

PROFILES = """\
[profiles.web-search]
consumer = "web-search-plugin"
env = { OPENAI_API_KEY = "@openai_api_key", JINA_API_KEY = "@jina_api_key" }
"""

SHOW_ENV = ["sh", "-c", 'printf "%s|%s" "$OPENAI_API_KEY" "$JINA_API_KEY"']


# --- helpers --------------------------------------------------------------------------------------


def events(cli: Cli, *args: str) -> list[dict[str, Any]]:
    """The audit trail as JSON (optionally filtered)."""
    doc: dict[str, list[dict[str, Any]]] = json.loads(cli.ok("audit", "--json", *args))
    return doc["events"]


def audit_text(cli: Cli) -> str:
    return (cli.home / "audit.log").read_text()


def add_formation_secrets(cli: Cli) -> None:
    cli.add("@OPENAI_API_KEY", CANARY)
    cli.add("@ANTHROPIC_API_KEY", CANARY_2, provider="anthropic")
    cli.add("@BRAVE_API_KEY", BRAVE, provider="brave")


def rendered_formation() -> str:
    return (FORMATION.replace("${{ secrets.OPENAI_API_KEY }}", CANARY)
            .replace("${{secrets.ANTHROPIC_API_KEY}}", CANARY_2)
            .replace("${{ secrets.BRAVE_API_KEY }}", BRAVE))


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def run_broker(cli: Cli, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """The CLI with file descriptors of the test's choosing (a pipe, a pty)."""
    proc = subprocess.run([sys.executable, "-m", "broker", *args], env=cli.env,
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, **kw)
    cli.outputs.append(proc.stderr.decode())
    return proc


def one_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code` and no traceback; returns stderr."""
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("secret-broker: error: ")
    assert "Traceback" not in proc.stderr
    return proc.stderr


def setup_profile(cli: Cli, grants: str, profiles: str = PROFILES) -> None:
    cli.add("@openai_api_key", OPENAI)
    cli.add("@jina_api_key", JINA, provider="jina")
    write_grants(cli.home, grants)
    write(cli.home / "profiles.toml", profiles).chmod(0o600)


# --- inject ---------------------------------------------------------------------------------------


def test_formation_rendered_to_a_private_file(cli: Cli, tmp_path: Path) -> None:
    """A MUXI-style formation renders to a 0600 file; each ref audited once, no value logged."""
    add_formation_secrets(cli)
    template = write(tmp_path / "formation.afs", FORMATION)
    out = tmp_path / "deploy" / "formation.afs"
    out.parent.mkdir()
    assert cli.ok("inject", "-i", str(template), "-o", str(out)) == ""
    assert out.read_text() == rendered_formation()
    assert BRAVE in out.read_text()  # a template-looking value stays exactly as it is
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["formation.afs"]  # no temp left
    injected = events(cli, "--event", "secret.injected")
    assert [(e["secret_ref"], e["actor"], e["outcome"]) for e in injected] == [
        ("OPENAI_API_KEY", "cli", "allowed"), ("ANTHROPIC_API_KEY", "cli", "allowed"),
        ("BRAVE_API_KEY", "cli", "allowed")]
    assert events(cli, "@openai_api_key") == []  # the ref inside BRAVE's value was not read
    assert scan(audit_text(cli), *VALUES) == []
    assert scan(cli.outputs, *VALUES) == []
    assert "OK: 7 events" in cli.ok("audit", "verify")


def test_service_config_to_a_descriptor_and_a_pipe(cli: Cli, tmp_path: Path) -> None:
    """`--out-fd` into a pipe and stdout into a pipe give the same bytes, CRLF kept."""
    cli.add("@openai_api_key", OPENAI)
    template = write(tmp_path / "service.toml.tpl", SERVICE_CONFIG)
    expected = SERVICE_CONFIG.replace("{{ @openai_api_key }}", OPENAI).encode()
    read_end, write_end = os.pipe()
    with subprocess.Popen([sys.executable, "-m", "broker", "inject", "-i", str(template),
                           "--out-fd", str(write_end)], env=cli.env, pass_fds=(write_end,),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            through_fd = pipe.read()
        stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stdout, stderr) == (0, b"", b"")
    assert through_fd == expected
    piped = run_broker(cli, "inject", "-i", str(template), stdout=subprocess.PIPE)
    assert (piped.returncode, piped.stdout) == (0, expected)
    assert [e["secret_ref"] for e in events(cli, "--event", "secret.injected")] == [
        "openai_api_key", "openai_api_key"]
    assert scan(audit_text(cli), OPENAI) == []
    assert scan(cli.outputs, OPENAI) == []


def test_missing_refs_write_nothing_and_are_all_named(cli: Cli, tmp_path: Path) -> None:
    """Two of three refs missing: exit 3 naming both, no file, no output, nothing audited."""
    cli.add("@OPENAI_API_KEY", CANARY)
    template = write(tmp_path / "formation.afs", FORMATION)
    out = tmp_path / "formation.rendered"
    before = audit_text(cli)
    err = one_error(cli("inject", "-i", str(template), "-o", str(out)), 3)
    assert "@ANTHROPIC_API_KEY, @BRAVE_API_KEY" in err
    assert "@OPENAI_API_KEY" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["formation.afs"]
    to_stdout = cli("inject", "-i", str(template))
    assert to_stdout.stdout == ""
    assert "@ANTHROPIC_API_KEY, @BRAVE_API_KEY" in one_error(to_stdout, 3)
    assert audit_text(cli) == before
    assert scan(cli.outputs, CANARY) == []


def test_existing_output_needs_force(cli: Cli, tmp_path: Path) -> None:
    """An existing file or link is kept without --force; --force replaces it with a 0600 file."""
    cli.add("@openai_api_key", OPENAI)
    template = write(tmp_path / "service.toml.tpl", SERVICE_CONFIG)
    out = write(tmp_path / "service.toml", "old\n")
    out.chmod(0o644)
    link, target = tmp_path / "link.toml", tmp_path / "elsewhere.toml"
    link.symlink_to(target)
    for path in (out, link):
        err = one_error(cli("inject", "-i", str(template), "-o", str(path)), 1)
        assert f"{path} exists" in err and "--force" in err
    assert out.read_text() == "old\n" and not target.exists()
    assert events(cli, "--event", "secret.injected") == []
    for path in (out, link):
        cli.ok("inject", "-i", str(template), "-o", str(path), "--force")
        assert path.read_bytes() == SERVICE_CONFIG.replace("{{ @openai_api_key }}",
                                                           OPENAI).encode()
        assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not target.exists()


def test_terminal_output_is_refused(cli: Cli, tmp_path: Path) -> None:
    """A TTY on stdout or behind --out-fd is refused: exit 2, nothing written or audited."""
    cli.add("@openai_api_key", OPENAI)
    template = write(tmp_path / "service.toml.tpl", SERVICE_CONFIG)
    before = audit_text(cli)
    master, slave = pty.openpty()
    try:
        on_stdout = run_broker(cli, "inject", "-i", str(template), stdout=slave)
        on_fd = run_broker(cli, "inject", "-i", str(template), "--out-fd", str(slave),
                           stdout=subprocess.DEVNULL, pass_fds=(slave,))
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 4096)  # the terminal received nothing
    finally:
        os.close(master)
        os.close(slave)
    assert on_stdout.returncode == 2
    assert b"stdout is a terminal" in on_stdout.stderr
    assert on_fd.returncode == 2
    assert f"--out-fd {slave} is a terminal".encode() in on_fd.stderr
    assert audit_text(cli) == before
    assert scan(cli.outputs, OPENAI) == []


def test_malformed_template_names_the_line(cli: Cli, tmp_path: Path) -> None:
    """A broken reference is a usage error at its line and column; the line is not echoed."""
    cli.add("@OPENAI_API_KEY", CANARY)
    template = write(tmp_path / "f.afs", "ok: 1\nkey: ${{ secrets.OPENAI API KEY }} # sk-inline\n")
    out = tmp_path / "out.afs"
    err = one_error(cli("inject", "-i", str(template), "-o", str(out)), 2)
    assert f"{template}: line 2, column 6: '${{{{ secrets.' does not start" in err
    assert "sk-inline" not in err
    assert not out.exists()
    assert events(cli, "--event", "secret.injected") == []
    err = one_error(cli("inject", "-i", str(tmp_path / "absent.tpl")), 2)
    assert "cannot read" in err


# --- exec --env-file ------------------------------------------------------------------------------


ENV_FILE = """\
# web-search plugin
OPENAI_API_KEY=@openai_api_key

export JINA_API_KEY=${{ secrets.jina_api_key }}
AUTH_HEADER="Bearer {{ @openai_api_key }}"
LOG_LEVEL=debug
OVERRIDDEN=@jina_api_key
"""
SHOW_FILE_ENV = ["sh", "-c", 'printf "%s|%s|%s|%s|%s" "$OPENAI_API_KEY" "$JINA_API_KEY" '
                 '"$AUTH_HEADER" "$LOG_LEVEL" "$OVERRIDDEN"']


def test_env_file_with_mixed_lines(cli: Cli, tmp_path: Path) -> None:
    """Refs of both forms, plain values and comments; --env wins before or after the file."""
    cli.add("@openai_api_key", OPENAI)
    cli.add("@jina_api_key", JINA, provider="jina")
    env_file = write(tmp_path / "plugin.env", ENV_FILE)
    expected = f"{OPENAI}|{JINA}|Bearer {OPENAI}|debug|{OPENAI}"
    flag = ("--env", "OVERRIDDEN=@openai_api_key")
    assert cli.ok("exec", *flag, "--env-file", str(env_file), "--", *SHOW_FILE_ENV) == expected
    assert cli.ok("exec", "--env-file", str(env_file), *flag, "--", *SHOW_FILE_ENV) == expected
    execs = events(cli, "--event", "secret.exec")
    assert [(e["secret_ref"], e["env"], e["outcome"]) for e in execs] == [
        ("openai_api_key", "OPENAI_API_KEY,AUTH_HEADER,OVERRIDDEN", "allowed"),
        ("jina_api_key", "JINA_API_KEY", "allowed")] * 2
    assert all("consumer" not in e for e in execs)
    assert scan(audit_text(cli), OPENAI, JINA) == []


def test_malformed_env_file_line_launches_nothing(cli: Cli, tmp_path: Path) -> None:
    """A malformed line is an error naming the file and line number; no child, no audit."""
    cli.add("@openai_api_key", OPENAI)
    env_file = write(tmp_path / "plugin.env", "# ok\nA=@openai_api_key\nsk-pasted-value\n")
    marker = tmp_path / "launched"
    before = audit_text(cli)
    err = one_error(cli("exec", "--env-file", str(env_file), "--", "touch", str(marker)), 2)
    assert f"{env_file}, line 3: not VAR=value" in err
    assert "sk-pasted-value" not in err
    assert not marker.exists()
    assert audit_text(cli) == before


# --- exec --profile -------------------------------------------------------------------------------


def test_supervisor_launches_a_plugin_by_profile(cli: Cli) -> None:
    """With env grants the profile's variables reach the child, audited with its consumer."""
    setup_profile(cli, grant("openai_api_key", "web-search-plugin", delivery='"env"')
                  + grant("jina_api_key", "web-search-plugin", delivery='"env"'))
    assert cli.ok("exec", "--profile", "web-search", "--", *SHOW_ENV) == f"{OPENAI}|{JINA}"
    execs = events(cli, "--event", "secret.exec")
    assert [(e["secret_ref"], e["consumer"], e["env"], e["outcome"]) for e in execs] == [
        ("openai_api_key", "web-search-plugin", "OPENAI_API_KEY", "allowed"),
        ("jina_api_key", "web-search-plugin", "JINA_API_KEY", "allowed")]
    out = cli.ok("grants", "check")
    assert "secrets.grants.toml: valid, 2 grant(s)" in out
    assert "profiles.toml: valid, 1 profile(s)" in out
    doc = json.loads(cli.ok("grants", "check", "--json"))
    assert doc["profiles"] == {"file": str(cli.home / "profiles.toml"), "valid": True, "count": 1}
    assert scan(audit_text(cli), OPENAI, JINA) == []


def test_denied_profile_names_the_grant_to_add(cli: Cli, tmp_path: Path) -> None:
    """No env grant for one ref: exit 4, nothing launched, a [[grants]] snippet that works."""
    setup_profile(cli, grant("openai_api_key", "web-search-plugin", delivery='"env"')
                  + grant("jina_api_key", "web-search-plugin"))  # native and header only
    marker = tmp_path / "launched"
    err = one_error(cli("exec", "--profile", "web-search", "--", "touch", str(marker)), 4)
    assert not marker.exists()
    assert "profile 'web-search' was not launched" in err
    assert "@jina_api_key" in err and "@openai_api_key" not in err
    snippet = err.split(":\n\n", 1)[1]
    (suggested,) = parse_grants(snippet)
    assert (suggested.secret_ref, suggested.consumer, suggested.delivery) == (
        "jina_api_key", "web-search-plugin", ("env",))
    execs = events(cli, "--event", "secret.exec")
    assert [(e["secret_ref"], e["consumer"], e["outcome"]) for e in execs] == [
        ("jina_api_key", "web-search-plugin", "denied")]
    assert "delivery" in execs[0]["reason"]
    grants = (cli.home / "secrets.grants.toml").read_text()
    write_grants(cli.home, grants + "\n" + snippet)  # pasted as printed
    assert cli.ok("exec", "--profile", "web-search", "--", *SHOW_ENV) == f"{OPENAI}|{JINA}"
    assert scan(cli.outputs[:-2] + cli.outputs[-1:], OPENAI, JINA) == []  # not the child's


def test_profile_setting_ld_preload_is_refused(cli: Cli, tmp_path: Path) -> None:
    """LD_PRELOAD in a profile: nothing launches, run and check both name the variable."""
    profiles = PROFILES.replace("env = {", 'env = { LD_PRELOAD = "@jina_api_key",')
    setup_profile(cli, grant("openai_api_key", "web-search-plugin", delivery='"env"')
                  + grant("jina_api_key", "web-search-plugin", delivery='"env"'), profiles)
    marker = tmp_path / "launched"
    before = audit_text(cli)
    err = one_error(cli("exec", "--profile", "web-search", "--", "touch", str(marker)), 1)
    assert "profiles.web-search.env.LD_PRELOAD: LD_PRELOAD cannot be set from a profile" in err
    assert not marker.exists()
    assert audit_text(cli) == before
    assert "LD_PRELOAD cannot be set" in one_error(cli("grants", "check"), 1)


def test_profile_usage_errors(cli: Cli) -> None:
    """An unknown profile is exit 3 naming the known ones; --profile with --env is exit 2."""
    setup_profile(cli, grant("openai_api_key", "web-search-plugin", delivery='"env"'))
    err = one_error(cli("exec", "--profile", "nope", "--", "true"), 3)
    assert "no profile 'nope'" in err and "web-search" in err
    err = one_error(cli("exec", "--profile", "web-search", "--env", "A=@openai_api_key", "--",
                        "true"), 2)
    assert "--profile" in err
    write(cli.home / "profiles.toml", '[profiles.p]\nconsumer = "c"\nenvironment = {}\n')
    err = one_error(cli("exec", "--profile", "p", "--", "true"), 1)
    assert "profiles.p.environment: unknown key" in err
