"""The audit log as the CLI writes it: events and fields, filters, tampering caught by
`audit verify`, concurrent writers, and a log that cannot be written refusing the action.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.core.home import Home
from broker.service.context import Context
from broker.service.queries import Queries
from tests.conftest import Cli, base_env, move_audit_log, tmpfs

TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def events(cli: Cli, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(cli.ok("audit", *args, "--json"))["events"])


def raw_lines(home: Path) -> list[bytes]:
    return (home / "audit.log").read_bytes().splitlines()


def verify(cli: Cli) -> tuple[int, dict[str, Any]]:
    proc = cli("audit", "verify", "--json")
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


# --- events and filters ------------------------------------------------------------------------


def test_every_mutation_is_audited(cli: Cli) -> None:
    """add, rotate, exec, token rotate and remove each write their event with its fields."""
    token_before = (cli.home / "broker.token").read_text().strip()
    cli.add("@a", "value-a")
    cli.ok("rotate", "@a", "--stdin", input="value-a2")
    cli.ok("exec", "--env", "A_KEY=@a", "--", "true")
    cli.ok("token", "rotate")
    cli.ok("remove", "@a")
    got = events(cli)
    drop = ("ts", "seq", "prev", "mac")
    assert [{k: v for k, v in e.items() if k not in drop} for e in got] == [
        {"event": "broker.initialized", "actor": "cli", "backend": "file-vault"},
        {"event": "secret.added", "actor": "cli", "secret_ref": "a", "provider": "openai",
         "kind": "api_key", "backend": "file-vault", "version": 1},
        {"event": "secret.rotated", "actor": "cli", "secret_ref": "a", "version": 2},
        {"event": "secret.exec", "actor": "cli", "secret_ref": "a", "env": "A_KEY",
         "outcome": "allowed"},
        {"event": "token.rotated", "actor": "cli"},
        {"event": "secret.removed", "actor": "cli", "secret_ref": "a", "version": 2},
    ]
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5, 6]
    assert all(TS_RE.fullmatch(e["ts"]) for e in got)
    assert [e["ts"] for e in got] == sorted(e["ts"] for e in got)
    lines = raw_lines(cli.home)
    assert got[0]["prev"] == "0" * 64
    for line, event in zip(lines, got[1:], strict=False):
        assert event["prev"] == hashlib.sha256(line).hexdigest()
    log = (cli.home / "audit.log").read_text()
    token_after = (cli.home / "broker.token").read_text().strip()
    assert token_before != token_after
    for needle in ("value-a", token_before, token_after):
        assert needle not in log
    assert verify(cli) == (0, {"ok": True, "checked": 6, "first_bad_line": None, "reason": None})


def test_refused_mutations_are_not_audited(cli: Cli) -> None:
    """A refused add (existing ref) or a missing ref writes no event."""
    cli.add("@a", "v")
    before = raw_lines(cli.home)
    assert cli("add", "@a", "--provider", "openai", "--kind", "api_key", "--stdin",
               input="w").returncode == 1
    assert cli("rotate", "@missing", "--stdin", input="w").returncode == 3
    assert cli("exec", "--env", "V=@missing", "--", "true").returncode == 3
    assert raw_lines(cli.home) == before


def test_audit_filters(cli: Cli) -> None:
    """`audit @ref`, `--event` (exact or prefix), `--since` and `--json` select correctly."""
    cli.add("@a", "va")
    cli.add("@b", "vb", provider="jina")
    cli.ok("rotate", "@a", "--stdin", input="va2")
    cli.ok("exec", "--env", "B=@b", "--", "true")
    cli.ok("token", "rotate")
    every = events(cli)
    assert len(every) == 6
    cut = every[3]["ts"]
    queries = {  # independent reads: run them at once
        "a": ("@a",), "b": ("b",), "added": ("--event", "secret.added"),
        "prefix": ("--event", "secret."), "no_dot": ("--event", "secret"),
        "a_rotated": ("@a", "--event", "secret.rotated"), "hour": ("--since", "1h"),
        "future": ("--since", "2999-01-01T00:00:00Z"), "cut": ("--since", cut),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = dict(zip(queries, pool.map(lambda q: events(cli, *q), queries.values()),
                       strict=True))
        table, bad_since, bad_ref, word, none = pool.map(lambda args: cli(*args), [
            ("audit", "@a"), ("audit", "--since", "yesterday"), ("audit", "@bad/ref"),
            ("audit", "tail"), ("audit", "@a", "--event", "lease.")])

    assert [(e["event"], e["secret_ref"]) for e in got["a"]] == [
        ("secret.added", "a"), ("secret.rotated", "a")]
    assert [e["event"] for e in got["b"]] == ["secret.added", "secret.exec"]
    assert [e["secret_ref"] for e in got["added"]] == ["a", "b"]
    assert [e["event"] for e in got["prefix"]] == [
        "secret.added", "secret.added", "secret.rotated", "secret.exec"]
    assert got["no_dot"] == []
    assert [e["event"] for e in got["a_rotated"]] == ["secret.rotated"]
    assert got["hour"] == every
    assert got["future"] == []
    assert got["cut"] == [e for e in every if e["ts"] >= cut]
    assert got["cut"][0]["seq"] <= 4

    header, *rows = table.stdout.splitlines()
    assert header.split() == ["TIME", "SEQ", "EVENT", "ACTOR", "DETAILS"]
    assert [r.split()[2] for r in rows] == ["secret.added", "secret.rotated"]
    assert "secret_ref=a" in rows[0] and "provider=openai" in rows[0]
    assert bad_since.returncode == 2 and "--since 'yesterday'" in bad_since.stderr
    assert bad_ref.returncode == 2 and "invalid secret ref" in bad_ref.stderr
    # An empty answer says so, and a word that is not a command is shown as the ref it is.
    assert table.stderr == ""
    assert (word.returncode, word.stdout.split()) == (0, ["TIME", "SEQ", "EVENT", "ACTOR",
                                                          "DETAILS"])
    assert word.stderr.strip() == ("no audit events match @tail; `audit` takes @REF to filter "
                                   "by, or `verify`")
    assert none.stderr.strip() == "no audit events match @a --event lease."


# --- tampering -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sealed_home() -> Iterator[Path]:
    """A home whose 7-line log the CLI wrote; each tamper test works on a copy."""
    root = Path(tempfile.mkdtemp(prefix="sba-", dir="/tmp"))
    c = Cli(root / "h", base_env(root / "h"))
    c.ok("init", "--backend", "file-vault")                 # 1 broker.initialized
    c.add("@a", "va")                                       # 2 secret.added a
    c.add("@b", "vb", provider="jina")                      # 3 secret.added b
    c.ok("rotate", "@a", "--stdin", input="va2")            # 4 secret.rotated a
    c.ok("exec", "--env", "A=@a", "--", "true")             # 5 secret.exec a
    c.ok("token", "rotate")                                 # 6 token.rotated
    c.ok("remove", "@b")                                    # 7 secret.removed b
    assert len(raw_lines(root / "h")) == 7
    yield root / "h"
    shutil.rmtree(root, ignore_errors=True)


def _edit_field(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"provider":"jina"', b'"provider":"openai"')
    return lines


def _delete_line(lines: list[bytes]) -> list[bytes]:
    del lines[3]
    return lines


def _swap_lines(lines: list[bytes]) -> list[bytes]:
    lines[3], lines[4] = lines[4], lines[3]
    return lines


def _reseal_prev(lines: list[bytes]) -> list[bytes]:
    """Edit line 2, then recompute every later `prev` as someone without the key could."""
    lines[1] = lines[1].replace(b'"kind":"api_key"', b'"kind":"password"')
    for i in range(2, len(lines)):
        old = json.loads(lines[i])["prev"].encode()
        lines[i] = lines[i].replace(old, hashlib.sha256(lines[i - 1]).hexdigest().encode())
    return lines


def _cut_two(lines: list[bytes]) -> list[bytes]:
    return lines[:-2]


def _cut_one(lines: list[bytes]) -> list[bytes]:
    return lines[:-1]


def _edit_last(lines: list[bytes]) -> list[bytes]:
    lines[6] = lines[6].replace(b'"secret_ref":"b"', b'"secret_ref":"c"')
    return lines


def _drop_first(lines: list[bytes]) -> list[bytes]:
    return lines[1:]


@pytest.mark.parametrize(("tamper", "bad_line", "reason"), [
    (_edit_field, 3, "MAC mismatch"),
    (_delete_line, 4, "chain broken"),
    (_swap_lines, 4, "chain broken"),
    (_reseal_prev, 2, "MAC mismatch"),
    (_cut_two, 6, "cut off the end"),
    (_cut_one, 7, "cut off the end"),
    (_edit_last, 7, "MAC mismatch"),
    (_drop_first, 1, "chain broken"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_tampering_is_caught_at_its_line(home: Path, sealed_home: Path,
                                         tamper: Callable[[list[bytes]], list[bytes]],
                                         bad_line: int, reason: str) -> None:
    """`audit verify` exits non-zero and names the first bad line (1-based)."""
    shutil.copytree(sealed_home, home, symlinks=True)
    cli = Cli(home, base_env(home))
    log = home / "audit.log"
    log.write_bytes(b"".join(line + b"\n" for line in tamper(raw_lines(home))))
    code, verdict = verify(cli)
    assert code == 1
    assert (verdict["ok"], verdict["first_bad_line"]) == (False, bad_line), verdict
    assert reason in verdict["reason"]
    human = cli("audit", "verify")
    assert human.returncode == 1
    assert f"audit log BROKEN at line {bad_line}:" in human.stderr


def test_untouched_log_verifies(home: Path, sealed_home: Path) -> None:
    """The same log, untouched, verifies with every event checked."""
    shutil.copytree(sealed_home, home, symlinks=True)
    cli = Cli(home, base_env(home))
    assert verify(cli) == (0, {"ok": True, "checked": 7, "first_bad_line": None, "reason": None})
    assert cli.ok("audit", "verify").strip() == "audit log OK: 7 events, chain and seals intact"


def test_log_from_another_home_fails(sealed_home: Path, cli: Cli) -> None:
    """A valid log copied in from another home fails at line 1: its MAC key differs."""
    shutil.copyfile(sealed_home / "audit.log", cli.home / "audit.log")
    code, verdict = verify(cli)
    assert (code, verdict["first_bad_line"]) == (1, 1)


# --- concurrency ---------------------------------------------------------------------------------


def test_parallel_writers_keep_one_chain(cli: Cli) -> None:
    """10 concurrent CLI writers leave a verifying chain with all 10 events, seq strictly +1."""
    cli.add("@a", "v")
    argv = ("exec", "--env", "A=@a", "--", "true")
    with ThreadPoolExecutor(max_workers=10) as pool:
        procs = list(pool.map(lambda _: cli(*argv), range(10)))
    assert [p.returncode for p in procs] == [0] * 10, [p.stderr for p in procs]
    code, verdict = verify(cli)
    assert (code, verdict["checked"]) == (0, 12), verdict
    got = events(cli)
    assert [e["seq"] for e in got] == list(range(1, 13))
    assert [e["event"] for e in got].count("secret.exec") == 10


# --- a log that cannot be written ----------------------------------------------------------------


@contextlib.contextmanager
def audit_log_on_tmpfs(home: Path, size: str = "64k") -> Iterator[Path]:
    """Move the home's audit.log onto a small tmpfs (a symlink points there); unmount after."""
    with tmpfs(size) as mnt:
        move_audit_log(home, mnt)
        yield mnt


def _fill(mnt: Path) -> None:
    """Write a filler file until the file system refuses (ENOSPC)."""
    with (mnt / "filler").open("wb", buffering=0) as fh:
        chunk = b"\0" * 4096
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return


def _pad_to_page(cli: Cli) -> None:
    """Grow the log to a 4 KiB boundary with one real event (a long env name in `exec`), so
    the next line needs a new tmpfs page instead of slack in the last one."""
    cli.ok("exec", "--env", "P=@a", "--", "true")
    base = len(raw_lines(cli.home)[-1])  # that line (1-character name) plus its newline, less 1
    need = -(cli.home / "audit.log").stat().st_size % 4096
    name_len = need - base if need > base else need - base + 4096
    cli.ok("exec", "--env", "P" * name_len + "=@a", "--", "true")
    assert (cli.home / "audit.log").stat().st_size % 4096 == 0


def _refused_add(cli: Cli, before: bytes) -> str:
    """`add` is refused because it cannot be audited, and leaves no trace; returns the error."""
    proc = cli("add", "@new", "--provider", "openai", "--kind", "api_key", "--stdin",
               input="value-new")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "audit" in line and "refused" in line
    assert [s["ref"] for s in json.loads(cli.ok("list", "--json"))["secrets"]] == ["a"]
    assert not (cli.home / "vault" / "s-new.sbv").exists()
    assert (cli.home / "audit.log").read_bytes() == before  # not even half a line
    return line


def test_full_file_system_refuses_the_action(cli: Cli) -> None:
    """An audit log on a full file system: add fails (exit 1, "audit"), nothing is stored."""
    cli.add("@a", "v")
    with audit_log_on_tmpfs(cli.home) as mnt:
        _pad_to_page(cli)
        _fill(mnt)
        before = (cli.home / "audit.log").read_bytes()
        assert "No space left on device" in _refused_add(cli, before)
        os.unlink(mnt / "filler")
        cli.add("@new", "value-new")  # with room again, the same command works
        assert verify(cli)[0] == 0


def test_read_only_file_system_refuses_the_action(cli: Cli) -> None:
    """An audit log on a read-only file system: add fails (exit 1, "audit"), nothing stored."""
    cli.add("@a", "v")
    with audit_log_on_tmpfs(cli.home) as mnt:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = (cli.home / "audit.log").read_bytes()
        assert "Read-only file system" in _refused_add(cli, before)
        assert cli("exec", "--env", "V=@a", "--", "true").returncode == 1
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert verify(cli)[0] == 0


APPENDER = """
import sys
from pathlib import Path
from broker.core.home import Home
from broker.service.context import Context
ctx = Context.open(Home(Path(sys.argv[1])))
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    ctx.record("test.tick", count=i)
"""


def test_verify_while_another_process_appends_sees_no_tampering(cli: Cli) -> None:
    """`audit verify` reads the log and its checkpoint as one moment: a line appended (and
    checkpointed) by another process in between must not read as a cut or an edit."""
    queries = Queries(Context.open(Home(cli.home), cli.env))
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(cli.home), "600"],
                              env=cli.env, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    verdicts = []
    while writer.poll() is None:
        verdicts.append(queries.verify_audit())
    assert writer.returncode == 0
    assert len(verdicts) >= 10  # verified again and again while the lines came in
    assert [v for v in verdicts if not v.ok] == []
    assert queries.verify_audit().checked == 601
