"""The service files and their installer: systemd user unit, launchd agent, install scripts.

Every test runs the real scripts/install-service and scripts/uninstall-service as a user
would, with HOME pointed at a temporary directory and --no-start (or --no-stop), so nothing
touches this machine's service manager. The unit is checked by `systemd-analyze verify`
(scripts/test installs systemd where it is missing); the plist by plistlib and by running its
wrapper with a stand-in for macOS's `security`.
"""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-service"
UNINSTALL = REPO / "scripts" / "uninstall-service"
UNIT_NAME = "secret-broker.service"
LABEL = "com.secret-broker.agent"
CANARY = "pp-canary-" + uuid.uuid4().hex

HARDENING = {
    "Restart": "on-failure",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "PrivateUsers": "yes",
    "ProtectSystem": "strict",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "LimitCORE": "0",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectHostname": "yes",
    "SystemCallFilter": "@system-service",
    "UnsetEnvironment": "SECRET_BROKER_PASSPHRASE",
}


def broker_exe() -> Path:
    """The installed console script: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "secret-broker"
    found = beside if beside.exists() else Path(shutil.which("secret-broker") or "")
    assert found.is_file() and os.access(found, os.X_OK), \
        "the `secret-broker` console script is not installed (pip install -e .)"
    return found


def user_env(user_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SECRET_BROKER_", "XDG_")) and k != "CREDENTIALS_DIRECTORY"}
    env["HOME"] = str(user_home)
    env.update(extra)
    return env


def run_script(script: Path, user_home: Path, *args: str, **extra: str
               ) -> subprocess.CompletedProcess[str]:
    # Run as a program (shebang and executable bit included), the way the docs tell users to.
    return subprocess.run([str(script), *args], env=user_env(user_home, **extra),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def install(user_home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run_script(INSTALL, user_home, "--exe", str(broker_exe()), *args, **extra)


def install_ok(user_home: Path, *args: str, **extra: str) -> str:
    proc = install(user_home, *args, **extra)
    assert proc.returncode == 0, \
        f"install {args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def target(user_home: Path, os_name: str) -> Path:
    if os_name == "macos":
        return user_home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    return user_home / ".config" / "systemd" / "user" / UNIT_NAME


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: content, mtime (ns) and mode."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = (path.read_bytes(), st.st_mtime_ns,
                                                stat.S_IMODE(st.st_mode))
    return out


def unit_settings(text: str, section: str = "Service") -> list[tuple[str, str]]:
    """(key, value) pairs of one section of a unit file, in order; comments skipped."""
    pairs, current = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def systemd_verify(unit: Path, user_home: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/test installs the `systemd` package"
    runtime = user_home / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = user_env(user_home, XDG_RUNTIME_DIR=str(runtime))
    proc = subprocess.run([analyze, "--user", "verify", "--man=no", str(unit)], env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and unit.name not in proc.stderr:
        # The user-manager mode could not even start here (it says why, never naming our
        # unit); the system mode parses the same directives with the same checks.
        proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], env=env,
                              capture_output=True, text=True, timeout=120)
    return proc


def assert_verified(unit: Path, user_home: Path) -> None:
    proc = systemd_verify(unit, user_home)
    ours = [line for line in proc.stderr.splitlines() if unit.name in line]
    assert ours == [], f"systemd-analyze complains about the unit:\n{proc.stderr}"
    assert proc.returncode == 0, f"systemd-analyze verify exit {proc.returncode}:\n{proc.stderr}"


@pytest.fixture
def user_home(tmp_path: Path) -> Path:
    home = tmp_path / "user"
    home.mkdir()
    return home


# -- the systemd unit ---------------------------------------------------------------------------


def test_systemd_analyze_verify_accepts_the_installed_unit(user_home: Path) -> None:
    """`systemd-analyze verify` reads the unit the installer writes without a complaint."""
    install_ok(user_home, "--os", "linux", "--no-start")
    assert_verified(target(user_home, "linux"), user_home)


def test_unit_survives_awkward_paths_and_an_encrypted_credential(user_home: Path) -> None:
    """A space and `%` in the paths, plus LoadCredentialEncrypted=, still verify cleanly."""
    bindir = user_home / "my bin%n"
    bindir.mkdir()
    (bindir / "secret-broker").symlink_to(broker_exe())
    cred = user_home / "passphrase.cred"
    cred.write_bytes(b"not really encrypted: systemd-analyze does not decrypt")
    home = user_home / "broker home%h"
    proc = run_script(INSTALL, user_home, "--os", "linux", "--no-start",
                      "--exe", str(bindir / "secret-broker"), "--home", str(home),
                      "--passphrase-cred", str(cred))
    assert proc.returncode == 0, proc.stderr
    unit = target(user_home, "linux")
    settings = unit_settings(unit.read_text())
    assert ("ExecStart", f'"{bindir}/secret-broker" serve'.replace("%", "%%")) in settings
    assert ("Environment", f'"SECRET_BROKER_HOME={home}"'.replace("%", "%%")) in settings
    assert ("ReadWritePaths", f'"-{home}"'.replace("%", "%%")) in settings
    assert ("LoadCredentialEncrypted", f"passphrase:{cred}") in settings
    # The verifier checks that ExecStart names an executable: the quoting found it.
    assert_verified(unit, user_home)


def test_unit_is_hardened_and_carries_no_passphrase(user_home: Path) -> None:
    """The unit has the hardening, runs `EXE serve` on the home, and no passphrase env line."""
    # A passphrase in the installer's own environment must not leak into what it writes.
    install_ok(user_home, "--os", "linux", "--no-start", SECRET_BROKER_PASSPHRASE=CANARY)
    text = target(user_home, "linux").read_text()
    settings = unit_settings(text)
    values = dict(settings)
    for key, expected in HARDENING.items():
        assert values.get(key) == expected, f"{key}={values.get(key)!r}, want {expected!r}"
    home = user_home / ".secret-broker"
    assert values["ExecStart"] == f"{broker_exe()} serve"
    assert values["ReadWritePaths"] == f"-{home}"
    environment = [v for k, v in settings if k == "Environment"]
    assert environment == [f"SECRET_BROKER_HOME={home}"]
    assert not any("SECRET_BROKER_PASSPHRASE" in v for v in environment)
    assert not any(k.startswith(("LoadCredential", "SetCredential")) for k, _ in settings), \
        "a home with no passphrase needs no credential"
    assert CANARY not in text
    assert unit_settings(text, "Install") == [("WantedBy", "default.target")]
    assert stat.S_IMODE(target(user_home, "linux").stat().st_mode) == 0o644


def test_passphrase_file_credential_must_be_private(user_home: Path) -> None:
    """--passphrase-file refuses a group/other-readable file and names the chmod that fixes it."""
    secret = user_home / "passphrase"
    secret.write_text(CANARY)
    secret.chmod(0o644)
    proc = install(user_home, "--os", "linux", "--no-start", "--passphrase-file", str(secret))
    assert proc.returncode == 1
    assert f"chmod 600 {secret}" in proc.stderr
    assert not target(user_home, "linux").exists()

    secret.chmod(0o600)
    install_ok(user_home, "--os", "linux", "--no-start", "--passphrase-file", str(secret))
    text = target(user_home, "linux").read_text()
    assert ("LoadCredential", f"passphrase:{secret}") in unit_settings(text)
    assert CANARY not in text
    assert_verified(target(user_home, "linux"), user_home)


def test_reinstall_without_options_keeps_the_credential(user_home: Path) -> None:
    """Running the installer again without --passphrase-* keeps the credential it installed."""
    cred = user_home / "passphrase.cred"
    cred.write_bytes(b"sealed")
    install_ok(user_home, "--os", "linux", "--no-start", "--passphrase-cred", str(cred))
    before = target(user_home, "linux").read_bytes()
    out = install_ok(user_home, "--os", "linux", "--no-start")
    assert "unchanged" in out
    assert target(user_home, "linux").read_bytes() == before


# -- the launchd agent --------------------------------------------------------------------------


def test_plist_loads_and_carries_no_secret(user_home: Path) -> None:
    """The agent plist parses, restarts on failure, logs under the home and holds no secret."""
    install_ok(user_home, "--os", "macos", "--no-start", SECRET_BROKER_PASSPHRASE=CANARY)
    raw = target(user_home, "macos").read_bytes()
    plist = plistlib.loads(raw)
    home = user_home / ".secret-broker"
    assert plist["Label"] == LABEL
    args = plist["ProgramArguments"]
    assert Path(args[0]).is_absolute()
    assert args[-2:] == [str(broker_exe()), "serve"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).parent == home / "run"
    assert plist["EnvironmentVariables"] == {"SECRET_BROKER_HOME": str(home)}
    assert plist["Umask"] == 0o077
    assert plist["HardResourceLimits"]["Core"] == 0
    assert CANARY.encode() not in raw
    # The only passphrase-related setting is where to read it from: a pipe on stdin.
    script = args[2]
    assert "SECRET_BROKER_PASSPHRASE=" not in script
    assert "SECRET_BROKER_PASSPHRASE_FILE=/dev/stdin" in script
    assert stat.S_IMODE(target(user_home, "macos").stat().st_mode) == 0o644


FAKE_SECURITY = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
[ "$FAKE_ITEM" = yes ] || exit 44
case " $* " in *" -w "*) printf '%s\\n' "$FAKE_PASSPHRASE" ;; esac
"""

FAKE_BROKER = """import json, os, signal, sys, time
doc = {"pid": os.getpid(), "argv": sys.argv[1:],
       "env_passphrase": "SECRET_BROKER_PASSPHRASE" in os.environ,
       "file": os.environ.get("SECRET_BROKER_PASSPHRASE_FILE")}
if doc["file"]:
    with open(doc["file"]) as f:
        doc["passphrase"] = f.read()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
with open(os.environ["FAKE_OUT"] + ".tmp", "w") as f:
    json.dump(doc, f)
os.rename(os.environ["FAKE_OUT"] + ".tmp", os.environ["FAKE_OUT"])
if os.environ["CRASH"]:
    sys.exit(int(os.environ["CRASH"]))
while True:
    time.sleep(0.05)
"""


def agent_script(user_home: Path) -> str:
    """The /bin/sh wrapper the installed plist runs."""
    install_ok(user_home, "--os", "macos", "--no-start")
    args = plistlib.loads(target(user_home, "macos").read_bytes())["ProgramArguments"]
    assert args[:2] == ["/bin/sh", "-c"]
    return str(args[2])


def run_agent(tmp: Path, script: str, *, item: bool, crash: int | None = None
              ) -> tuple[dict[str, object], int, int, str]:
    """Run the wrapper as launchd would, with stand-ins for `security` and the broker.

    Unless the broker stand-in crashes by itself, SIGTERM the wrapper (launchd's stop) once
    the broker is up. Returns what the broker saw, the wrapper's pid and exit status, and
    the arguments `security` was called with.
    """
    tmp.mkdir()
    security, broker = tmp / "security", tmp / "broker"
    security.write_text(FAKE_SECURITY)
    broker.write_text(f"#!{sys.executable}\n{FAKE_BROKER}")
    for exe in (security, broker):
        exe.chmod(0o755)
    out, log = tmp / "out.json", tmp / "security.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "SECRET_BROKER_HOME": "/Users/u/broker home", "FAKE_ITEM": "yes" if item else "no",
           "FAKE_PASSPHRASE": CANARY, "FAKE_LOG": str(log), "FAKE_OUT": str(out),
           "CRASH": "" if crash is None else str(crash)}
    assert script.count("/usr/bin/security") == 2
    proc = subprocess.Popen(["/bin/sh", "-c", script.replace("/usr/bin/security", str(security)),
                             "secret-broker", str(broker), "serve"], env=env)
    try:
        deadline = time.monotonic() + 20
        while not out.exists():
            assert crash is not None or proc.poll() is None, \
                f"the wrapper exited {proc.returncode} before the broker started"
            assert time.monotonic() < deadline, "the broker stand-in never started"
            time.sleep(0.02)
        if crash is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if out.exists():  # a wrapper that failed to pass the signal on leaves the broker behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(json.loads(out.read_text())["pid"], signal.SIGKILL)
    return json.loads(out.read_text()), proc.pid, code, log.read_text() if log.exists() else ""


def test_launchd_wrapper_pipes_the_keychain_passphrase(user_home: Path, tmp_path: Path) -> None:
    """With a Keychain item the broker reads it from a pipe, never from its environment."""
    doc, _, code, calls = run_agent(tmp_path / "a", agent_script(user_home), item=True)
    assert doc["argv"] == ["serve"]
    assert doc["file"] == "/dev/stdin"
    assert doc["passphrase"] == CANARY + "\n"  # the broker drops one trailing newline
    assert doc["env_passphrase"] is False
    assert "find-generic-password -s secret-broker-passphrase -a /Users/u/broker home -w" \
        in calls.splitlines()
    assert code == 7, "SIGTERM must reach the broker and its exit status be the agent's"


def test_launchd_wrapper_passes_a_crash_on_to_keepalive(user_home: Path, tmp_path: Path) -> None:
    """A broker that fails makes the agent fail with its status, so KeepAlive restarts it."""
    _, _, code, _ = run_agent(tmp_path / "a", agent_script(user_home), item=True, crash=5)
    assert code == 5


def test_launchd_wrapper_execs_the_broker_without_an_item(user_home: Path, tmp_path: Path) -> None:
    """Key-file and keychain homes: the shell execs the broker, which gets no passphrase file."""
    doc, wrapper_pid, code, _ = run_agent(tmp_path / "a", agent_script(user_home), item=False)
    assert doc["pid"] == wrapper_pid
    assert doc["file"] is None and doc["env_passphrase"] is False
    assert code == 7


# -- the installer and uninstaller --------------------------------------------------------------


@pytest.mark.parametrize("os_name", ["linux", "macos"])
def test_dry_run_writes_nothing_and_lists_exactly_the_files(user_home: Path, os_name: str) -> None:
    """--dry-run changes nothing and names the files; the real run writes exactly those."""
    before = snapshot(user_home)
    proc = install(user_home, "--os", os_name, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(user_home) == before
    planned = [line.removeprefix("would write: ") for line in proc.stdout.splitlines()
               if line.startswith("would write: ")]
    assert planned == [str(target(user_home, os_name))]
    assert any(line.startswith("would run: ") for line in proc.stdout.splitlines())

    install_ok(user_home, "--os", os_name, "--no-start")
    after = snapshot(user_home)
    written = {str(user_home / name) for name in after.keys() - before.keys()}
    assert written == set(planned)


@pytest.mark.parametrize("os_name", ["linux", "macos"])
def test_second_install_changes_nothing(user_home: Path, os_name: str) -> None:
    """Installing twice leaves the file byte-identical with its mtime, and says `unchanged`."""
    install_ok(user_home, "--os", os_name, "--no-start")
    first = snapshot(user_home)
    time.sleep(0.01)  # an mtime that moved would now differ
    out = install_ok(user_home, "--os", os_name, "--no-start")
    assert "unchanged" in out
    assert snapshot(user_home) == first
    dry = install(user_home, "--os", os_name, "--dry-run")
    assert f"unchanged: {target(user_home, os_name)}" in dry.stdout
    assert "would write" not in dry.stdout


@pytest.mark.parametrize("os_name", ["linux", "macos"])
def test_edited_file_is_kept_unless_forced(user_home: Path, os_name: str) -> None:
    """An edited unit/plist is refused (exit 1, naming file and --force); --force replaces it."""
    install_ok(user_home, "--os", os_name, "--no-start")
    path = target(user_home, os_name)
    pristine = path.read_text()
    edited = pristine.replace("<integer>10</integer>", "<integer>30</integer>") \
        if os_name == "macos" else pristine.replace("RestartSec=5", "RestartSec=30")
    assert edited != pristine
    path.write_text(edited)

    proc = install(user_home, "--os", os_name, "--no-start")
    assert proc.returncode == 1
    assert str(path) in proc.stderr and "--force" in proc.stderr
    assert path.read_text() == edited
    dry = install(user_home, "--os", os_name, "--dry-run")
    assert dry.returncode == 1 and "--force" in dry.stderr

    out = install_ok(user_home, "--os", os_name, "--no-start", "--force")
    assert "replaced" in out
    assert path.read_text() == pristine


def test_unedited_stale_unit_is_updated_without_force(user_home: Path, tmp_path: Path) -> None:
    """A unit the installer wrote and nobody edited follows a new --exe without --force."""
    install_ok(user_home, "--os", "linux", "--no-start")
    moved = tmp_path / "elsewhere" / "secret-broker"
    moved.parent.mkdir()
    moved.symlink_to(broker_exe())
    proc = run_script(INSTALL, user_home, "--os", "linux", "--no-start", "--exe", str(moved))
    assert proc.returncode == 0, proc.stderr
    assert "updated" in proc.stdout
    assert dict(unit_settings(target(user_home, "linux").read_text()))["ExecStart"] == \
        f"{moved} serve"


@pytest.mark.parametrize("os_name", ["linux", "macos"])
def test_uninstall_removes_exactly_what_install_wrote(user_home: Path, os_name: str) -> None:
    """Uninstall removes the installed file only: the broker home and drop-ins stay."""
    broker_home = user_home / ".secret-broker"
    broker_home.mkdir(mode=0o700)
    (broker_home / "config.toml").write_text("[store]\nbackend = \"file-vault\"\n")
    before = snapshot(user_home)
    install_ok(user_home, "--os", os_name, "--no-start")
    dropin = target(user_home, os_name).with_name(UNIT_NAME + ".d") / "local.conf"
    if os_name == "linux":
        dropin.parent.mkdir()
        dropin.write_text("[Service]\nRestartSec=9\n")
        before = {**before, str(dropin.relative_to(user_home)): snapshot(user_home)[
            str(dropin.relative_to(user_home))]}

    dry = run_script(UNINSTALL, user_home, "--os", os_name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove: {target(user_home, os_name)}" in dry.stdout
    assert target(user_home, os_name).exists()

    proc = run_script(UNINSTALL, user_home, "--os", os_name, "--no-stop")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(user_home) == before
    again = run_script(UNINSTALL, user_home, "--os", os_name, "--no-stop")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$SYSTEMCTL_LOG"
case " $* " in
  *" enable --now "*|*" restart "*) INVOCATION_ID=stand-in exec "$BROKER_EXE" start >/dev/null ;;
esac
"""


def test_install_starts_the_service_and_waits_for_the_broker(user_home: Path) -> None:
    """Without --no-start it enables and starts the unit, then waits until the broker answers."""
    # A short home path: the broker's Unix socket path must stay under 108 bytes.
    broker_home = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp")) / "h"
    bindir = user_home / "bin"
    bindir.mkdir()
    (bindir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bindir / "systemctl").chmod(0o755)
    calls = user_home / "systemctl.log"
    extra = {"SECRET_BROKER_HOME": str(broker_home), "SYSTEMCTL_LOG": str(calls),
             "BROKER_EXE": str(broker_exe()),
             "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    init = subprocess.run([str(broker_exe()), "init", "--backend", "file-vault"],
                          env=user_env(user_home, **extra), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert init.returncode == 0, init.stderr
    try:
        out = install_ok(user_home, "--os", "linux", **extra)
        assert calls.read_text().splitlines() == [
            "--user daemon-reload", f"--user enable --now {UNIT_NAME}"]
        assert "the broker is running" in out and "under systemd" in out
        assert f"journalctl --user -u {UNIT_NAME}" in out
    finally:
        subprocess.run([str(broker_exe()), "stop"], env=user_env(user_home, **extra),
                       capture_output=True, timeout=60)
        shutil.rmtree(broker_home.parent, ignore_errors=True)
