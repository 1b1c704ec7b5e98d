#!/usr/bin/env python3
"""Micro-benchmark: wall time of `secret-broker exec --env K=@ref -- true` against `true` alone.

Three stores: the file vault unlocked by a key file, the OS keychain (a real Secret Service,
gnome-keyring), and the file vault unlocked by a passphrase (one Argon2id derivation per
command). Prints median and p90 per store, then the slowest imports of one `exec`
(`python -X importtime`).

    python scripts/bench_exec.py [--runs 40] [--passphrase-runs 12]

With no D-Bus session it re-executes itself under `dbus-run-session -- scripts/with-keyring`
(a throwaway, unlocked keyring); pass --no-keychain to skip that store instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VALUE = "sk-bench-" + "x" * 40


def cli_argv() -> list[str]:
    """The installed `secret-broker` next to this interpreter, else `python -m broker`."""
    script = shutil.which("secret-broker", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "broker"]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SECRET_BROKER_") and k != "CREDENTIALS_DIRECTORY"}
    env["SECRET_BROKER_HOME"] = str(home)
    env.update(extra)
    return env


def run(argv: Sequence[str], env: dict[str, str] | None = None, stdin: str | None = None) -> None:
    proc = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")


def make_home(root: Path, name: str, backend: str, **extra: str) -> dict[str, str]:
    home = root / name
    env = clean_env(home, **extra)
    run([*cli_argv(), "init", "--backend", backend], env)
    run([*cli_argv(), "add", "@bench", "--provider", "openai", "--kind", "api_key", "--stdin"],
        env, VALUE)
    return env


def timed(argv: Sequence[str], env: dict[str, str] | None, runs: int, warmup: int = 2
          ) -> list[float]:
    """Wall time of each run, in ms (after `warmup` untimed runs to fill the page cache)."""
    samples = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = (time.perf_counter() - started) * 1000
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed: {proc.stderr.decode()}")
        if i >= warmup:
            samples.append(elapsed)
    return samples


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10, method="inclusive")[8]


def slowest_imports(env: dict[str, str], top: int) -> list[tuple[int, int, str]]:
    """(cumulative µs, self µs, module) of one `exec`, slowest first."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "broker", "exec", "--env", "K=@bench", "--",
         "true"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative, name = (part.strip() for part in line[12:].split("|"))
        rows.append((int(cumulative), int(self_us), name))
    return sorted(rows, reverse=True)[:top]


def forget_keychain_entries(env: dict[str, str]) -> None:
    """Remove what the keychain home stored, so a real keyring is left as it was."""
    from broker.store.keychain import find_backend

    db = sqlite3.connect(Path(env["SECRET_BROKER_HOME"]) / "metadata.db")
    (instance,) = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    db.close()
    backend = find_backend()
    for ref in ("bench", "!instance-key"):
        with contextlib.suppress(Exception):
            backend.delete_password(f"secret-broker:{instance}", ref)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--passphrase-runs", type=int, default=12)
    parser.add_argument("--no-keychain", action="store_true")
    parser.add_argument("--imports", type=int, default=15, help="how many slow imports to list")
    args = parser.parse_args()

    if not args.no_keychain and not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        if shutil.which("dbus-run-session") is None:
            sys.exit("no D-Bus session and no dbus-run-session: use --no-keychain")
        argv = ["dbus-run-session", "--", str(ROOT / "scripts/with-keyring"), sys.executable,
                __file__, *sys.argv[1:]]
        os.execvp(argv[0], argv)  # noqa: S606 - re-run this script inside a D-Bus session

    cmd = [*cli_argv(), "exec", "--env", "K=@bench", "--", "true"]
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp:
        root = Path(tmp)
        pw = root / "passphrase.txt"
        pw.write_text("a bench passphrase\n")
        pw.chmod(0o600)
        homes = {"key-file vault": (make_home(root, "keyfile", "file-vault"), args.runs)}
        if not args.no_keychain:
            homes["keychain (Secret Service)"] = (make_home(root, "keychain", "keychain"),
                                                 args.runs)
        homes["passphrase vault (Argon2id)"] = (
            make_home(root, "passphrase", "file-vault", SECRET_BROKER_PASSPHRASE_FILE=str(pw)),
            args.passphrase_runs)

        rows.append(("`true` directly", timed(["true"], None, args.runs * 2)))
        for label, (env, runs) in homes.items():
            rows.append((label, timed(cmd, env, runs)))
        imports = slowest_imports(homes["key-file vault"][0], args.imports)
        if not args.no_keychain:
            forget_keychain_entries(homes["keychain (Secret Service)"][0])

    base = statistics.median(rows[0][1])
    print(f"secret-broker exec --env K=@ref -- true   ({platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()})\n")
    print(f"{'store':30} {'runs':>5} {'median ms':>10} {'p90 ms':>8} {'overhead ms':>12}")
    for label, samples in rows:
        med = statistics.median(samples)
        print(f"{label:30} {len(samples):5d} {med:10.1f} {p90(samples):8.1f} "
              f"{med - base:12.1f}")
    print("\nslowest imports of one `exec` (key-file vault), by cumulative time:")
    print(f"{'cumulative ms':>14} {'self ms':>8}  module")
    for cumulative, self_us, name in imports:
        print(f"{cumulative / 1000:14.1f} {self_us / 1000:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
