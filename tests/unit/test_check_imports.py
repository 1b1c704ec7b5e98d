"""scripts/check_imports.py, the test command's import check, fails on what it exists to catch:
a cycle (one hidden in a function included), an upward import, `grants` importing `broker`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and the script, to break on purpose."""
    for package in ("broker", "grants"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check_imports.py", tmp_path / "scripts")
    return tmp_path


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(tree / "scripts" / "check_imports.py")],
                          capture_output=True, text=True, timeout=60, check=False)


def add_function(path: Path, body: str) -> None:
    with path.open("a") as f:
        f.write(f"\n\ndef _added() -> None:\n    {body}\n")


def test_the_project_as_it_is_passes(tree: Path) -> None:
    proc = check(tree)
    assert proc.returncode == 0, proc.stdout
    assert "no cycle" in proc.stdout


def test_a_cycle_hidden_in_a_function_fails(tree: Path) -> None:
    # access <- state <- gateway, all in the server layer: no layer is crossed upwards.
    add_function(tree / "broker" / "server" / "access.py", "from broker.server import gateway")
    proc = check(tree)
    assert proc.returncode == 1
    cycle = next(line for line in proc.stdout.splitlines() if line.startswith("import cycle"))
    assert {"broker.server.access", "broker.server.gateway", "broker.server.state"} <= set(
        cycle.partition(": ")[2].split(", "))
    assert "higher layer" not in proc.stdout


def test_an_upward_import_fails_and_names_its_line(tree: Path) -> None:
    add_function(tree / "broker" / "store" / "vault.py", "import broker.service.secrets")
    proc = check(tree)
    assert proc.returncode == 1
    assert "broker/store/vault.py:" in proc.stdout
    assert "broker.store.vault imports broker.service.secrets, a higher layer" in proc.stdout


def test_grants_importing_broker_fails(tree: Path) -> None:
    add_function(tree / "grants" / "policy.py", "from broker.core import refs")
    proc = check(tree)
    assert proc.returncode == 1
    assert "grants must not import broker.core.refs" in proc.stdout
