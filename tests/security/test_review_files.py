"""Files next to a target and in `run/`: planted temp names, links and a deleted pid file.

An attacker who can write a directory plants what the broker would open there (the old
predictable temp name, a symlink, a file it holds open); an accident deletes the pid file
under a running daemon. Every test drives the real CLI or daemon as separate processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyrage
import pytest

from broker.client import BrokerClient
from broker.core.errors import BrokerNotRunning
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
    """A world-readable file planted at the old temp name and held open gets no byte."""
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
    """A symlink planted at the old temp name is neither written through nor in the way."""
    cli.add("@k", CANARY)
    args, out = _output_command(kind, tmp_path)
    loot = tmp_path / "loot"
    loot.touch()
    proc = run_after_planting(cli, lambda pid: old_temp_name(out, pid).symlink_to(loot), *args)
    assert proc.returncode == 0, proc.stderr
    assert loot.read_bytes() == b""
    assert not out.is_symlink() and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert CANARY not in proc.stdout + proc.stderr


# --- run/: the pid lock, the socket, the log -------------------------------------------------


def answering_pid(home: Path) -> int | None:
    """The pid of the daemon that answers on the home's socket, if one does."""
    try:
        doc = BrokerClient(socket_path=home / "run" / "broker.sock", timeout=5.0).status()
    except BrokerNotRunning:
        return None
    return int(doc["pid"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def started(cli: Cli) -> Iterator[list[int]]:
    """Pids of the daemons a test got from `start`; any still alive is killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_deleted_pid_file_does_not_let_start_launch_a_second_daemon(cli: Cli,
                                                                    started: list[int]) -> None:
    """With run/broker.pid deleted, start/status/stop still find the first daemon."""
    listen = f"127.0.0.1:{free_port()}"
    cli.ok("start", "--listen", listen)
    first = answering_pid(cli.home)
    assert first is not None
    started.append(first)
    (cli.home / "run" / "broker.pid").unlink()
    again = cli("start", "--listen", listen)
    if (pid := answering_pid(cli.home)) not in (None, first):
        started.append(pid)
    assert (again.returncode, again.stdout) == (
        0, f"the broker is already running (pid {first})\n"), again.stderr
    assert answering_pid(cli.home) == first
    assert f"running: pid {first}," in cli.ok("status")
    assert cli.ok("stop") == f"broker stopped (pid {first})\n"
    assert answering_pid(cli.home) is None
    assert cli("status").returncode == 6


def test_serve_refuses_while_another_daemon_answers_on_the_socket(cli: Cli,
                                                                  daemon_factory: Any) -> None:
    """With the pid file deleted, a second `serve` refuses and leaves the first's socket."""
    first = daemon_factory()
    (cli.home / "run" / "broker.pid").unlink()
    second = cli("serve", "--listen", "127.0.0.1:0")
    assert second.returncode == 1 and "already running" in second.stderr, second.stderr
    assert answering_pid(cli.home) == first.proc.pid


def test_a_stopping_daemon_removes_only_its_own_socket(cli: Cli, daemon_factory: Any) -> None:
    """A stopping daemon leaves alone a newer daemon's socket that replaced its own."""
    old = daemon_factory()
    (cli.home / "run" / "broker.sock").unlink()
    (cli.home / "run" / "broker.pid").unlink()
    new = daemon_factory()
    assert old.stop() == 0
    assert answering_pid(cli.home) == new.proc.pid


@pytest.mark.parametrize("name", ["broker.pid", "broker.log"])
def test_start_refuses_a_symlink_in_run(cli: Cli, started: list[int], tmp_path: Path,
                                        name: str) -> None:
    """A symlink at run/broker.pid or run/broker.log is refused by name, its target kept."""
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    planted = cli.home / "run" / name
    planted.symlink_to(victim)
    proc = cli("start", "--listen", "127.0.0.1:0")
    if (pid := answering_pid(cli.home)) is not None:
        started.append(pid)
    assert proc.returncode == 1 and f"{planted} is a symbolic link" in proc.stderr, proc.stderr
    assert victim.read_text() == "victim\n"
    assert pid is None


@pytest.mark.parametrize("how", ["mode", "symlink"])
def test_start_refuses_a_run_dir_that_is_not_private(cli: Cli, started: list[int],
                                                     tmp_path: Path, how: str) -> None:
    """A run/ others can enter, or a symlink, is refused before anything is written in it."""
    run = cli.home / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if how == "mode":
        run.chmod(0o755)
        watched = run
    else:
        run.rmdir()
        run.symlink_to(elsewhere)
        watched = elsewhere
    proc = cli("start", "--listen", "127.0.0.1:0")
    if (pid := answering_pid(cli.home)) is not None:
        started.append(pid)
    assert proc.returncode == 1 and str(run) in proc.stderr, proc.stderr
    assert list(watched.iterdir()) == []


def test_daemon_refuses_a_non_socket_at_the_socket_path(cli: Cli, started: list[int]) -> None:
    """A regular file at run/broker.sock is refused by name, not deleted."""
    planted = cli.home / "run" / "broker.sock"
    planted.write_text("not a socket\n")
    proc = cli("start", "--listen", "127.0.0.1:0")
    if (pid := answering_pid(cli.home)) is not None:
        started.append(pid)
    assert proc.returncode == 1 and f"{planted} is not a socket" in proc.stderr, proc.stderr
    assert planted.read_text() == "not a socket\n"
