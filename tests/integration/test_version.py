"""`--version` and `status` name the version, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from broker import __version__
from tests.conftest import Cli, base_env


def test_version_flag_prints_the_version_and_exits_0(tmp_path: Path) -> None:
    """`secret-broker --version` prints `secret-broker <version>` and exits 0, without a home."""
    proc = subprocess.run([sys.executable, "-m", "broker", "--version"], capture_output=True,
                          text=True, env=base_env(tmp_path / "none"), timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, f"secret-broker {__version__}\n", "")
    assert not (tmp_path / "none").exists()


def test_status_names_the_daemons_version(cli: Cli, daemon_factory: Any) -> None:
    """`status` shows the version of the daemon that answers."""
    daemon = daemon_factory()
    assert f"running: pid {daemon.proc.pid}, version {__version__}," in cli.ok("status")
