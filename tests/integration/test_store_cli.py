"""The store through the real CLI: file vault (key file and passphrase), tampering, bad input,
concurrency, crashes, canaries, exec and file modes.

Keychain round trips live in test_keychain.py (they need a D-Bus session).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import CANARY, CANARY_2, Cli, base_env, scan

PRINT_V = ["sh", "-c", 'printf %s "$V"']  # prints the injected value exactly, no newline added
PASSPHRASE = "correct horse battery staple"


# --- helpers --------------------------------------------------------------------------------------


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int,
                          *needles: str) -> str:
    """The command failed with `code`, one line on stderr, no traceback; returns that line."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}:\n{everything}"
    assert "Traceback" not in everything
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"wanted one error line, got:\n{proc.stderr}"
    assert lines[0].startswith("secret-broker: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


Call = tuple[Sequence[str], str | None]  # argv after `secret-broker`, and stdin


def run_many(cli: Cli, calls: Sequence[Call], workers: int = 4
             ) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI calls at the same time (outputs recorded as by cli())."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda call: cli(*call[0], input=call[1]), calls))


def value_of(cli: Cli, ref: str) -> str:
    """The stored value, read back the only way the CLI gives it out: exec."""
    return cli.ok("exec", "--env", f"V={ref}", "--", *PRINT_V)


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def vault_state(home: Path) -> dict[str, bytes]:
    """The vault files and the audit log: what a refused command must leave untouched."""
    state = {f"vault/{k}": v for k, v in files(home / "vault").items()}
    state["audit.log"] = (home / "audit.log").read_bytes()
    return state


def passphrase_env(home: Path, source: str, passphrase: str = PASSPHRASE,
                   name: str = "passphrase.txt") -> dict[str, str]:
    """Environment that unlocks a passphrase vault from `source` (files kept outside home)."""
    outside = home.parent
    if source == "file":
        path = outside / name
        path.write_text(passphrase + "\n")
        path.chmod(0o600)
        return base_env(home, SECRET_BROKER_PASSPHRASE_FILE=str(path))
    if source == "credentials":
        creds = outside / "credentials"
        creds.mkdir(mode=0o700, exist_ok=True)
        (creds / "passphrase").write_text(passphrase)
        return base_env(home, CREDENTIALS_DIRECTORY=str(creds))
    assert source == "env"
    return base_env(home, SECRET_BROKER_PASSPHRASE=passphrase)


@pytest.fixture(scope="module")
def passphrase_template() -> Iterator[Path]:
    """One passphrase vault (init + @a added) made once; tests copy it (Argon2 is slow)."""
    root = Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
    home = root / "h"
    c = Cli(home, passphrase_env(home, "file"))
    c.ok("init", "--backend", "file-vault")
    c.add("@a", "value-a")
    yield home
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pcli(home: Path, passphrase_template: Path) -> Cli:
    """A private copy of the passphrase vault, unlocked through SECRET_BROKER_PASSPHRASE_FILE."""
    shutil.copytree(passphrase_template, home, symlinks=True)
    return Cli(home, passphrase_env(home, "file"))


# --- both unlock modes of the file vault ----------------------------------------------------------


def test_key_file_vault_round_trip(cli: Cli) -> None:
    """Key-file vault: add, list, inspect, rotate, exec and remove through the real CLI."""
    cli.add("@openai_api_key", "sk-one")
    listed = json.loads(cli.ok("list", "--json"))["secrets"]
    assert [(s["ref"], s["backend"], s["version"]) for s in listed] == [
        ("openai_api_key", "file-vault", 1)]
    first = json.loads(cli.ok("inspect", "@openai_api_key", "--json"))
    assert first["provider"] == "openai" and first["kind"] == "api_key"
    assert first["fingerprint"].startswith("hmac-sha256:")
    assert first["last_used_at"] is None
    assert value_of(cli, "@openai_api_key") == "sk-one"
    assert json.loads(cli.ok("inspect", "@openai_api_key", "--json"))["last_used_at"]

    out = cli.ok("rotate", "@openai_api_key", "--stdin", input="sk-two\n")
    assert "version 2" in out
    second = json.loads(cli.ok("inspect", "openai_api_key", "--json"))
    assert second["version"] == 2 and second["rotated_at"] is not None
    assert second["fingerprint"] != first["fingerprint"]
    assert value_of(cli, "@openai_api_key") == "sk-two"

    cli.ok("remove", "@openai_api_key")
    assert json.loads(cli.ok("list", "--json")) == {"secrets": []}
    assert not (cli.home / "vault" / "s-openai_api_key.sbv").exists()
    assert_one_line_error(cli("exec", "--env", "V=@openai_api_key", "--", "true"), 3)


def test_key_file_named_by_environment(cli: Cli) -> None:
    """SECRET_BROKER_KEY_FILE unlocks a vault whose key file was moved out of the home."""
    cli.add("@a", "value-a")
    moved = cli.home.parent / "elsewhere.key"
    (cli.home / "vault.key").rename(moved)
    assert_one_line_error(cli("exec", "--env", "V=@a", "--", "true"), 5, "SECRET_BROKER_KEY_FILE")
    assert cli.ok("exec", "--env", "V=@a", "--", *PRINT_V,
                  env={"SECRET_BROKER_KEY_FILE": str(moved)}) == "value-a"


def test_passphrase_init_says_so(passphrase_template: Path) -> None:
    """init with a passphrase writes an Argon2id header at RFC 9106's option 2, no key file."""
    assert not (passphrase_template / "vault.key").exists()
    kdf = json.loads((passphrase_template / "vault" / "header.json").read_text())["kdf"]
    assert (kdf["alg"], kdf["m"], kdf["t"], kdf["p"]) == ("argon2id", 65536, 3, 4)
    config = (passphrase_template / "config.toml").read_text()
    assert 'backend = "file-vault"' in config


@pytest.mark.parametrize("source", ["file", "env", "credentials"])
def test_passphrase_sources_unlock(home: Path, passphrase_template: Path, source: str) -> None:
    """A passphrase from a file, the environment or $CREDENTIALS_DIRECTORY unlocks the vault."""
    shutil.copytree(passphrase_template, home, symlinks=True)
    c = Cli(home, passphrase_env(home, source))
    c.add("@k", "value-" + source)
    assert value_of(c, "@k") == "value-" + source


def test_passphrase_vault_needs_its_passphrase(pcli: Cli) -> None:
    """With no passphrase source and no terminal, unlocking fails (exit 5) naming the options."""
    proc = Cli(pcli.home, base_env(pcli.home))("exec", "--env", "V=@a", "--", "true")
    assert_one_line_error(proc, 5, "SECRET_BROKER_PASSPHRASE_FILE")


def test_wrong_passphrase_changes_nothing(pcli: Cli) -> None:
    """A wrong passphrase fails with exit 5 and leaves the vault and audit log byte-identical."""
    before = vault_state(pcli.home)
    wrong = passphrase_env(pcli.home, "file", "not the passphrase", name="wrong.txt")
    for args, stdin in [(("add", "@b", "--provider", "openai", "--kind", "api_key", "--stdin"),
                         "value-b"),
                        (("rotate", "@a", "--stdin"), "value-a2"),
                        (("remove", "@a"), None),
                        (("exec", "--env", "V=@a", "--", "true"), None)]:
        proc = pcli(*args, input=stdin, env=wrong)
        assert_one_line_error(proc, 5, "passphrase is wrong")
    assert vault_state(pcli.home) == before
    assert [s["ref"] for s in json.loads(pcli.ok("list", "--json"))["secrets"]] == ["a"]
    assert value_of(pcli, "@a") == "value-a"


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("m", 1024, "KDF parameter m=1024 is outside"),
    ("m", 4 * 1024 * 1024 * 1024, "KDF parameter m=4294967296 is outside"),
    ("t", 100_000, "KDF parameter t=100000 is outside"),
    ("salt", base64.b64encode(b"another salt 16b").decode(), "tampered with"),
])
def test_tampered_kdf_header(pcli: Cli, field: str, value: object, needle: str) -> None:
    """A KDF header pushed below the floor, above the ceiling or re-salted fails fast, exit 5."""
    header = pcli.home / "vault" / "header.json"
    doc = json.loads(header.read_text())
    doc["kdf"][field] = value
    header.write_text(json.dumps(doc))
    # The bounds message proves the KDF never ran with the pushed parameters (t=100000
    # would run for hours: the timeout is only a backstop, not a measurement).
    proc = pcli("exec", "--env", "V=@a", "--", "true", timeout=60)
    line = assert_one_line_error(proc, 5, needle)
    assert "header.json" in line


def test_flipped_byte_in_secret_file(cli: Cli) -> None:
    """A flipped byte anywhere in a secret file (magic, version, nonce, tag) is exit 5."""
    cli.add("@a", "value-a")
    path = cli.home / "vault" / "s-a.sbv"
    good = path.read_bytes()
    for offset in (0, 11, 20, len(good) // 2 + 10, len(good) - 1):
        blob = bytearray(good)
        blob[offset] ^= 0x01
        path.write_bytes(bytes(blob))
        assert_one_line_error(cli("exec", "--env", "V=@a", "--", "true"), 5, "@a")
    path.write_bytes(good)
    assert value_of(cli, "@a") == "value-a"


def test_ciphertext_copied_to_another_ref(cli: Cli) -> None:
    """A ciphertext copied from @a's file to @b's does not decrypt as @b (exit 5)."""
    cli.add("@a", "value-a")
    cli.add("@b", "value-b")
    vault = cli.home / "vault"
    shutil.copyfile(vault / "s-a.sbv", vault / "s-b.sbv")
    assert_one_line_error(cli("exec", "--env", "V=@b", "--", "true"), 5,
                          "@b", "copied from another secret")
    assert value_of(cli, "@a") == "value-a"


# --- bad input ------------------------------------------------------------------------------------

BAD_REFS = ["@", "@a b", "@../x", "@" + "a" * 129, "@..", "@.", "a/b", "@x\n", ""]


def test_bad_refs_are_usage_errors(cli: Cli) -> None:
    """Malformed refs are a one-line usage error (exit 2) for add and inspect; nothing stored."""
    before = files(cli.home / "vault")
    add = ("--provider", "openai", "--kind", "api_key", "--stdin")
    calls: list[Call] = [(("add", ref, *add), "v") for ref in BAD_REFS]
    calls += [(("inspect", ref), None) for ref in BAD_REFS[:4]]
    for proc in run_many(cli, calls):
        assert_one_line_error(proc, 2, "invalid secret ref")
    assert files(cli.home / "vault") == before
    assert json.loads(cli.ok("list", "--json")) == {"secrets": []}


def test_bad_ref_for_every_command(cli: Cli) -> None:
    """rotate, remove and exec refuse a traversal ref with exit 2 too."""
    calls: list[Call] = [(("rotate", "@../x", "--stdin"), "v"), (("remove", "@../x"), None),
                         (("exec", "--env", "V=@../x", "--", "true"), None)]
    for proc in run_many(cli, calls):
        assert_one_line_error(proc, 2, "invalid secret ref")
    assert not (cli.home / "x").exists() and not (cli.home / "s-..").exists()


def test_exactly_128_chars_is_a_valid_ref(cli: Cli) -> None:
    """The longest allowed ref (128 characters) is accepted and readable."""
    ref = "@" + "r" * 128
    cli.add(ref, "long")
    assert value_of(cli, ref) == "long"


def test_empty_value_refused(cli: Cli) -> None:
    """An empty value (after one newline is stripped) is refused with exit 2, nothing stored."""
    add = ("add", "@a", "--provider", "openai", "--kind", "api_key", "--stdin")
    for proc in run_many(cli, [(add, ""), (add, "\n"), (add, "\r\n")]):
        assert_one_line_error(proc, 2, "empty")
    assert json.loads(cli.ok("list", "--json")) == {"secrets": []}
    assert not (cli.home / "vault" / "s-a.sbv").exists()


def test_bad_provider_or_kind(cli: Cli) -> None:
    """A malformed provider or kind is a usage error naming it."""
    bad_provider, bad_kind = run_many(cli, [
        (("add", "@a", "--provider", "Open AI", "--kind", "api_key", "--stdin"), "v"),
        (("add", "@a", "--provider", "openai", "--kind", "apikey", "--stdin"), "v"),
    ])
    assert_one_line_error(bad_provider, 2, "invalid provider 'Open AI'")
    assert_one_line_error(bad_kind, 2, "invalid kind 'apikey'")


def test_existing_ref_refused_on_add(cli: Cli) -> None:
    """add refuses an existing ref (exit 1), names rotate, and keeps the old value."""
    cli.add("@a", "first")
    proc = cli("add", "@a", "--provider", "openai", "--kind", "api_key", "--stdin",
               input="second")
    assert_one_line_error(proc, 1, "@a already exists", "secret-broker rotate @a")
    assert value_of(cli, "@a") == "first"
    assert json.loads(cli.ok("inspect", "@a", "--json"))["version"] == 1


def test_missing_ref_exit_3(cli: Cli) -> None:
    """inspect, rotate, remove and exec of a ref that does not exist: exit 3, one line."""
    calls: list[Call] = [(("inspect", "@missing"), None), (("rotate", "@missing", "--stdin"), "v"),
                         (("remove", "@missing"), None),
                         (("exec", "--env", "V=@missing", "--", "true"), None)]
    for proc in run_many(cli, calls):
        assert_one_line_error(proc, 3, "@missing")


def test_add_strips_exactly_one_trailing_newline(cli: Cli) -> None:
    """--stdin strips one trailing newline and nothing else ("abc\\n\\n" keeps one)."""
    cases = {"two_lf": ("abc\n\n", "abc\n"), "lf": ("abc\n", "abc"), "none": ("abc", "abc"),
             "crlf": ("abc\r\n", "abc"), "spaces": (" abc \n", " abc "),
             "inner": ("a\nb\n", "a\nb")}
    add = ("--provider", "openai", "--kind", "api_key", "--stdin")
    for proc in run_many(cli, [(("add", f"@{name}", *add), stdin)
                               for name, (stdin, _) in cases.items()]):
        assert proc.returncode == 0, proc.stderr
    env = [a for name in cases for a in ("--env", f"V_{name}=@{name}")]
    printed = " ".join(f'"$V_{name}"' for name in cases)
    out = cli.ok("exec", *env, "--", "sh", "-c", f"printf '%s|' {printed}")
    assert out.split("|")[:-1] == [stored for _, stored in cases.values()]


def test_usage_errors_without_traceback(cli: Cli) -> None:
    """exec without a command, a malformed --env or a missing program are one-line errors."""
    cli.add("@a", "v")
    assert_one_line_error(cli("exec", "--env", "V=@a"), 2, "nothing to run")
    assert_one_line_error(cli("exec", "--env", "1V=@a", "--", "true"), 2, "VAR=@ref")
    assert_one_line_error(cli("exec", "--env", "V=a", "--", "true"), 2, "VAR=@ref")
    assert_one_line_error(cli("exec", "--env", "V=@a", "--", "/nonexistent/prog"), 2,
                          "command not found")


def test_commands_on_a_missing_home(home: Path) -> None:
    """Without `init`, commands fail with one line naming init."""
    c = Cli(home, base_env(home))
    for args in (("list",), ("inspect", "@a"), ("exec", "--env", "V=@a", "--", "true")):
        assert_one_line_error(c(*args), 1, "secret-broker init")
    assert not home.exists()


# --- concurrency and crashes ----------------------------------------------------------------------


def test_parallel_adds_lose_nothing(cli: Cli) -> None:
    """12 concurrent `add` processes: all 12 listed, readable, and audited in a valid chain."""
    values = {f"ref{i:02d}": f"value-{i}" for i in range(12)}
    add = ("--provider", "openai", "--kind", "api_key", "--stdin")
    calls: list[Call] = [(("add", f"@{ref}", *add), value) for ref, value in values.items()]
    for proc in run_many(cli, calls, workers=len(calls)):
        assert proc.returncode == 0, proc.stderr
    listed = json.loads(cli.ok("list", "--json"))["secrets"]
    assert sorted(s["ref"] for s in listed) == sorted(values)
    assert all(s["version"] == 1 for s in listed)
    env_args = [a for ref in values for a in ("--env", f"V_{ref}=@{ref}")]
    out = cli.ok("exec", *env_args, "--", "env")
    child = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("V_"))
    assert child == {f"V_{ref}": value for ref, value in values.items()}
    # init + 12 adds + 12 exec events, one per ref
    assert "OK: 25 events" in cli.ok("audit", "verify")
    added = json.loads(cli.ok("audit", "--event", "secret.added", "--json"))["events"]
    assert sorted(e["secret_ref"] for e in added) == sorted(values)


def _spin_until(predicate: Callable[[], bool], proc: subprocess.Popen[bytes]) -> bool:
    """Poll tightly until predicate() or the process ends; returns whether it held.

    wait_for's 20 ms poll would step right over the few milliseconds this aims into."""
    while proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.0002)
    return predicate()


def test_kill9_during_rotate_leaves_old_or_new(cli: Cli) -> None:
    """SIGKILL at varied points of `rotate` always leaves the old or the new value, readable."""
    cli.add("@k", "v-start")
    started = time.monotonic()
    cli.ok("rotate", "@k", "--stdin", input="v-timed")
    span = time.monotonic() - started
    rng = random.Random(20240229)  # fixed seed: the same fault points on every run
    audit_log, vault_file = cli.home / "audit.log", cli.home / "vault" / "s-k.sbv"
    current, outcomes = "v-timed", {"old": 0, "new": 0, "killed": 0, "killed_after_write": 0}
    for i in range(12):
        new = f"v-{i}"
        size, inode = audit_log.stat().st_size, vault_file.stat().st_ino
        proc = subprocess.Popen([sys.executable, "-m", "broker", "rotate", "@k", "--stdin"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=cli.env)
        assert proc.stdin is not None
        proc.stdin.write(new.encode())
        proc.stdin.close()
        # Injected fault points (not waits for state), in turn: anywhere in the command;
        # a few ms after its audit record; right after the new vault file is renamed in,
        # before metadata.db records it (the narrowest window).
        def audited(size: int = size) -> bool:
            return audit_log.stat().st_size > size

        def written(inode: int = inode) -> bool:
            return vault_file.stat().st_ino != inode

        if i % 3 == 0:
            time.sleep(rng.uniform(0.3, 1.1) * span)
        elif i % 3 == 1:
            if _spin_until(audited, proc):
                time.sleep(rng.uniform(0, 0.012))
        else:
            _spin_until(written, proc)
        proc.kill()
        killed = proc.wait() == -signal.SIGKILL
        outcomes["killed"] += killed
        outcomes["killed_after_write"] += killed and written()
        got = value_of(cli, "@k")
        assert got in (current, new), f"round {i}: read {got!r}, wanted {current!r}/{new!r}"
        outcomes["old" if got == current else "new"] += 1
        current = got
    assert outcomes["killed"] >= 5, outcomes  # the kills really landed mid-command
    assert outcomes["killed_after_write"] >= 1, outcomes
    assert "OK" in cli.ok("audit", "verify"), outcomes
    cli.ok("rotate", "@k", "--stdin", input="v-final")  # no stale lock or damage left behind
    assert value_of(cli, "@k") == "v-final"


def test_next_write_sweeps_a_killed_writers_temp_file(cli: Cli) -> None:
    """A `.NAME.tmp-RANDOM` left by a writer killed before its rename goes at the next write,
    and so does an older version's `.NAME.tmpPID`."""
    cli.add("@k", "v1")
    stale = [cli.home / "vault" / name for name in (".s-k.sbv.tmp-x1y2z3w4", ".s-k.sbv.tmp99999")]
    for path in stale:
        path.write_bytes(b"sealed bytes a killed rotate left")
    cli.ok("rotate", "@k", "--stdin", input="v2")
    assert not any(path.exists() for path in stale)
    assert value_of(cli, "@k") == "v2"


# --- canaries -------------------------------------------------------------------------------------


def _needles(value: str) -> list[str]:
    """The value, its base64 forms, and 8-character windows across its random part."""
    raw = value.encode()
    windows = [value[i : i + 8] for i in range(len(value) - 32, len(value) - 7, 8)]
    return [value, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("=")[4:28], *windows]


def test_canary_never_in_outputs_or_home_files(cli: Cli) -> None:
    """No output, error or non-vault file in the home holds a stored value in any form."""
    cli.add("@canary", CANARY)
    cli.ok("rotate", "@canary", "--stdin", input=CANARY_2 + "\n")
    reads: list[Call] = [(args, None) for args in (
        ("list",), ("list", "--json"), ("inspect", "@canary"), ("inspect", "@canary", "--json"),
        ("audit",), ("audit", "--json"), ("audit", "@canary", "--json"), ("audit", "verify"),
        ("exec", "--env", "V=@canary", "--", "true"))]
    assert [p.returncode for p in run_many(cli, reads)] == [0] * len(reads)
    add = ("--provider", "openai", "--kind", "api_key", "--stdin")
    errors: list[Call] = [
        (("add", "@canary", *add), CANARY),                                 # exists
        (("add", "@bad/ref", *add), CANARY),                                # bad ref
        (("add", "@new", "--provider", "Bad!", *add[2:]), CANARY),          # bad provider
        (("rotate", "@missing", "--stdin"), CANARY),                        # missing
        (("exec", "--env", "V=@canary", "--", "/nonexistent/prog"), None),  # no program
    ]
    assert [p.returncode for p in run_many(cli, errors)] == [1, 2, 2, 3, 2]
    needles = _needles(CANARY) + _needles(CANARY_2)
    assert scan(cli.outputs, *needles) == []
    home_files = {name: data for name, data in files(cli.home).items()
                  if not name.endswith(".sbv")}
    assert {"audit.log", "metadata.db", "config.toml", "broker.token"} <= set(home_files)
    for name, data in home_files.items():
        assert scan(data.decode("latin-1"), *needles) == [], name
    # Positive control: the value is really there, and the scan would have seen it.
    expected = _needles(CANARY_2)
    assert scan(value_of(cli, "@canary"), *needles) == [expected[0], *expected[4:]]


# --- exec -----------------------------------------------------------------------------------------


def test_exec_passes_the_exit_code_through(cli: Cli) -> None:
    """exec exits with the command's own code."""
    cli.add("@a", "v")
    assert cli("exec", "--env", "V=@a", "--", "sh", "-c", "exit 7").returncode == 7
    assert cli("exec", "--env", "V=@a", "--", "false").returncode == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_exec_child_killed_by_signal(cli: Cli, sig: signal.Signals) -> None:
    """A signal-killed command ends the CLI process the same way (exec replaces it)."""
    cli.add("@a", "v")
    proc = cli("exec", "--env", "V=@a", "--", "sh", "-c", f"kill -{sig.name[3:]} $$")
    assert proc.returncode == -sig


def test_exec_replaces_the_cli_process(cli: Cli) -> None:
    """The command runs as the CLI's own pid: no wrapper process holds the value."""
    cli.add("@a", "v")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "exec", "--env", "V=@a", "--", "sh", "-c", "echo $$"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli.env, text=True)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid


def test_exec_child_does_not_inherit_passphrase(home: Path, passphrase_template: Path) -> None:
    """With SECRET_BROKER_PASSPHRASE set, the child gets the value but not the passphrase."""
    shutil.copytree(passphrase_template, home, symlinks=True)
    c = Cli(home, {**passphrase_env(home, "env"), "UNRELATED_SETTING": "kept"})
    out = c.ok("exec", "--env", "V=@a", "--", "env")
    child_env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert child_env["V"] == "value-a"
    assert "SECRET_BROKER_PASSPHRASE" not in child_env
    assert PASSPHRASE not in out
    assert child_env["UNRELATED_SETTING"] == "kept"  # the rest of the env passes
    # No SECRET_BROKER_* variable reaches a child unless asked for (the home included).
    assert not [k for k in child_env if k.startswith("SECRET_BROKER_")]


# --- file modes -----------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_modes(cli: Cli) -> None:
    """The home and everything secret-bearing in it are private (SPEC §2)."""
    cli.add("@a", "v")
    h = cli.home
    assert mode(h) == 0o700
    for name in ("broker.token", "config.toml", "metadata.db", "audit.log",
                 "secrets.grants.toml", "vault.key", "vault/header.json", "vault/s-a.sbv"):
        assert mode(h / name) == 0o600, name
    assert mode(h / "vault") == 0o700
    assert mode(h / "run") == 0o700
    loose = [p for p in h.rglob("*") if mode(p) & 0o077]
    assert loose == []


def test_passphrase_home_modes(pcli: Cli) -> None:
    """A passphrase vault has no key file and the same private modes."""
    assert not (pcli.home / "vault.key").exists()
    assert [p for p in pcli.home.rglob("*") if mode(p) & 0o077] == []


LOOSE = [  # (file, loose mode, the chmod that fixes it, a command that must refuse)
    ("audit.log", 0o640, "600", ("add", "@b", "--provider", "openai", "--kind", "api_key",
                                 "--stdin")),
    ("audit.log", 0o604, "600", ("audit",)),
    ("audit.log", 0o640, "600", ("audit", "verify")),
    ("vault", 0o750, "700", ("add", "@b", "--provider", "openai", "--kind", "api_key",
                             "--stdin")),
    ("vault", 0o705, "700", ("exec", "--env", "V=@a", "--", "true")),
    ("vault.key", 0o640, "600", ("exec", "--env", "V=@a", "--", "true")),
    ("broker.token", 0o640, "600", ("serve", "--listen", "127.0.0.1:0")),
]


def test_loose_modes_refused(cli: Cli) -> None:
    """A group/other-readable token, vault or audit log: exit 1 naming the file and chmod."""
    cli.add("@a", "v")
    for name, loose, fix, args in LOOSE:
        path = cli.home / name
        path.chmod(loose)
        proc = cli(*args, input="value-b", timeout=30)
        path.chmod(0o700 if path.is_dir() else 0o600)
        assert_one_line_error(proc, 1, str(path), f"chmod {fix} {path}")
    assert [s["ref"] for s in json.loads(cli.ok("list", "--json"))["secrets"]] == ["a"]
    assert not (cli.home / "vault" / "s-b.sbv").exists()


def test_list_works_while_vault_is_locked(cli: Cli) -> None:
    """list and inspect need no unlock: metadata is readable without the key file."""
    cli.add("@a", "v")
    (cli.home / "vault.key").rename(cli.home.parent / "away.key")
    assert "a" in cli.ok("list")
    assert json.loads(cli.ok("inspect", "@a", "--json"))["ref"] == "a"
    assert_one_line_error(cli("exec", "--env", "V=@a", "--", "true"), 5, "key file")


def test_group_readable_vault_file_is_refused(cli: Cli) -> None:
    """A vault file (not just the directory) readable by others is refused, naming chmod."""
    cli.add("@k", CANARY)
    path = next((cli.home / "vault").glob("s-k.sbv"))
    path.chmod(0o640)
    proc = cli("exec", "--env", "K=@k", "--", "true")
    assert proc.returncode == 1 and f"chmod 600 {path}" in proc.stderr
    path.chmod(0o600)
    assert cli("exec", "--env", "K=@k", "--", "true").returncode == 0


def test_init_on_a_file_is_a_clear_error(home: Path) -> None:
    """SECRET_BROKER_HOME naming a file: exit 2 with a message, no traceback."""
    home.parent.mkdir(exist_ok=True)
    home.write_text("not a directory")
    proc = Cli(home, base_env(home))("init", "--backend", "file-vault")
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal" not in proc.stderr
