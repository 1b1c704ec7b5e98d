"""Files next to a target and in `run/`: planted temp names, links and a deleted pid file.

An attacker who can write a directory plants what the broker would open there (the old
predictable temp name, a symlink, a file it holds open); an accident deletes the pid file
under a running daemon. Every test drives the real CLI or daemon as separate processes.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyrage
import pytest

from tests.conftest import CANARY, Cli

# The CLI, started so that its pid is known before it runs: it prints its pid, waits for a
# line on stdin, then execs `python -m broker ARGS` (exec keeps the pid).
_EXEC_AFTER_GO = ("import os, sys; print(os.getpid(), flush=True); sys.stdin.readline(); "
                  "os.execv(sys.executable, [sys.executable, '-m', 'broker', *sys.argv[1:]])")


def run_after_planting(cli: Cli, plant: Callable[[int], None], *args: str
                       ) -> subprocess.CompletedProcess[str]:
    """Run the CLI with `plant(pid)` done first, the pid being the CLI's own."""
    with subprocess.Popen([sys.executable, "-c", _EXEC_AFTER_GO, *args], env=cli.env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        plant(int(proc.stdout.readline()))
        out, err = proc.communicate("go\n", timeout=60)
    cli.outputs += [out, err]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def old_temp_name(target: Path, pid: int) -> Path:
    """The temp name writes used to take beside `target`: `.NAME.tmpPID`."""
    return target.with_name(f".{target.name}.tmp{pid}")


def _output_command(kind: str, tmp_path: Path) -> tuple[list[str], Path]:
    """`inject -o FILE` or `export -o FILE`, and FILE."""
    out = tmp_path / "out" / f"{kind}.out"
    out.parent.mkdir()
    if kind == "inject":
        template = tmp_path / "t.tpl"
        template.write_text("KEY={{ @k }}\n")
        return ["inject", "-i", str(template), "-o", str(out)], out
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    return ["export", "--to", recipient, "-o", str(out)], out


@pytest.mark.parametrize("kind", ["inject", "export"])
def test_planted_open_temp_file_never_sees_the_output(cli: Cli, tmp_path: Path,
                                                      kind: str) -> None:
    """A file planted at the old temp name, world-readable and held open by the attacker,
    never receives a byte; the output is a fresh 0600 file."""
    cli.add("@k", CANARY)
    args, out = _output_command(kind, tmp_path)
    held: list[int] = []
    planted: list[Path] = []

    def plant(pid: int) -> None:
        planted.append(old_temp_name(out, pid))
        planted[0].touch()
        planted[0].chmod(0o666)
        held.append(os.open(planted[0], os.O_RDONLY))

    proc = run_after_planting(cli, plant, *args)
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.pread(held[0], 1 << 20, 0) == b""
    finally:
        os.close(held[0])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_size > 0
    # The attacker's file is left alone, and no other temp file is left behind.
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, planted[0].name])


@pytest.mark.parametrize("kind", ["inject", "export"])
def test_planted_temp_symlink_is_not_followed(cli: Cli, tmp_path: Path, kind: str) -> None:
    """A symlink planted at the old temp name, pointing at the attacker's file, is neither
    written through nor in the way: the command succeeds and the attacker's file stays empty."""
    cli.add("@k", CANARY)
    args, out = _output_command(kind, tmp_path)
    loot = tmp_path / "loot"
    loot.touch()
    proc = run_after_planting(cli, lambda pid: old_temp_name(out, pid).symlink_to(loot), *args)
    assert proc.returncode == 0, proc.stderr
    assert loot.read_bytes() == b""
    assert not out.is_symlink() and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert CANARY not in proc.stdout + proc.stderr
