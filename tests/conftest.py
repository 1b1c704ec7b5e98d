"""Shared fixtures: throwaway homes, the CLI as a real process, the daemon as a real process.

Everything runs the way a user runs it: `python -m broker …` in a subprocess with its own
SECRET_BROKER_HOME. Homes live under a short /tmp path so the Unix socket path stays
under the 108-byte limit whatever the test is called.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.core.errors import BrokerNotRunning
from broker.core.home import Home
from broker.service.new_home import init_home
from tests.support import warm_cli

# The team-vault fixtures (`template`, `world`) live with the team world they build.
pytest_plugins = ["tests.support.team"]

# Canary values: tests store these and then scan every output for them.
CANARY = "sk-canary-" + uuid.uuid4().hex
CANARY_2 = "sk-canary2-" + uuid.uuid4().hex


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run `slow` tests first: under xdist one worker takes each while the others share the
    rest, instead of one starting last and running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy (no fixed sleeps); fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SECRET_BROKER_") and k != "CREDENTIALS_DIRECTORY"}
    env["SECRET_BROKER_HOME"] = str(home)
    env.update(extra)
    return env


@dataclass
class Cli:
    home: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)  # everything printed, for canary scans

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        proc = warm_cli.run(args, input=input, env={**self.env, **(env or {})}, timeout=timeout)
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def ok(self, *args: str, **kw: Any) -> str:
        proc = self(*args, **kw)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def add(self, ref: str, value: str, provider: str = "openai") -> None:
        self.ok("add", ref, "--provider", provider, "--kind", "api_key", "--stdin", input=value)


@pytest.fixture
def home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    yield root / "h"
    shutil.rmtree(root, ignore_errors=True)


def new_home(home: Path, env: dict[str, str]) -> Cli:
    """A CLI on a fresh file-vault home unlocked by a generated key file (fast: no Argon2).

    The home is made in this process by the function `init` runs: the suite makes a few
    hundred homes, and an interpreter start for each would cost half a minute of CPU. The
    `init` command itself is tested as a process (test_store_cli, test_review_home).
    """
    init_home(Home(home), "file-vault", env)
    return Cli(home, env)


@pytest.fixture
def cli(home: Path) -> Cli:
    return new_home(home, base_env(home))


@pytest.fixture
def session_bus() -> None:
    """Fail (never skip) without the Secret Service that scripts/test starts."""
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        pytest.fail("needs a D-Bus session with a Secret Service: run the tests with "
                    "scripts/test (or dbus-run-session -- scripts/with-keyring pytest …)")


needs_secret_service = pytest.mark.usefixtures("session_bus")


@dataclass
class Daemon:
    home: Path
    proc: subprocess.Popen[bytes]
    port: int
    token: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None, unix: bool = False) -> BrokerClient:
        if unix:
            return BrokerClient(socket_path=self.home / "run" / "broker.sock")
        return BrokerClient(url=self.url, token=token if token is not None else self.token)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_daemon(home: Path, env: dict[str, str], *extra: str) -> Daemon:
    log_path = home.parent / f"daemon-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--listen", "127.0.0.1:0",
             "--log-format", "json", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    unix = BrokerClient(socket_path=home / "run" / "broker.sock", timeout=2.0)

    def answers() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            return unix.status()
        except BrokerNotRunning:
            return None

    status = wait_for(answers, what="the daemon to answer on its socket")
    token = (home / "broker.token").read_text().strip()
    return Daemon(home, proc, int(status["listen"].rsplit(":", 1)[1]), token, log_path)


@pytest.fixture
def daemon_factory(cli: Cli) -> Iterator[Any]:
    started: list[Daemon] = []

    def factory(*extra: str, env: dict[str, str] | None = None) -> Daemon:
        d = start_daemon(cli.home, {**cli.env, **(env or {})}, *extra)
        started.append(d)
        return d

    yield factory
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def write_grants(home: Path, text: str) -> None:
    """Replace the grants file atomically, as an editor that renames would."""
    tmp = home / ".grants.tmp"
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(home / "secrets.grants.toml")


def grant(ref: str, consumer: str = "default", purposes: str = '"llm.chat", "llm.embeddings"',
          delivery: str = '"native", "http_header_inject"', hosts: str = '"api.openai.com"',
          ttl: int = 300) -> str:
    return (f'[[grants]]\nsecret_ref = "{ref}"\nconsumer = "{consumer}"\n'
            f"purposes = [{purposes}]\ndelivery = [{delivery}]\n"
            f"allowed_hosts = [{hosts}]\nttl_secs = {ttl}\n\n")


def scan(texts: list[str] | str, *needles: str) -> list[str]:
    """The needles found anywhere in texts (empty list = no leak)."""
    blob = texts if isinstance(texts, str) else "\n".join(texts)
    return [n for n in needles if n in blob]


@pytest.fixture
def standins() -> Iterator[dict[str, Any]]:
    """One started stand-in upstream per provider, each expecting its real key."""
    from tests.support.gateway import start_standins, stop_standins

    started = start_standins()
    yield started
    stop_standins(started)


@pytest.fixture
def gateway(cli: Cli, standins: dict[str, Any]) -> Iterator[Any]:
    """A daemon whose providers point at the stand-ins, each provider's key granted to the
    default consumer, for one test."""
    from tests.support.gateway import kill, launch

    b = launch(cli, standins)
    yield b
    kill(b.daemon)


@pytest.fixture(scope="module")
def module_home() -> Iterator[Cli]:
    """A fresh file-vault home shared by one module's tests (one daemon, many attacks)."""
    root = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    yield new_home(root / "h", base_env(root / "h"))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gw(shared: Any) -> Any:
    """The module's own `shared` broker, alive, with the stand-ins' records cleared."""
    assert shared.daemon.proc.poll() is None, shared.log()
    for s in shared.standins.values():
        s.clear()
    return shared


@contextmanager
def tmpfs(size: str = "1m") -> Iterator[Path]:
    """A small private tmpfs (we run as root in CI): a disk that fills up or goes read-only
    without touching the machine's. Unmounted (lazily, if a process still holds it) at exit."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root: run the tests as root, as CI does")
    mnt = Path(tempfile.mkdtemp(prefix="sb-mnt-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mnt)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        mnt.rmdir()


def move_audit_log(home: Path, directory: Path) -> Path:
    """Put the home's audit log (its content kept) on another file system, via a symlink."""
    target = directory / "audit.log"
    shutil.copyfile(home / "audit.log", target)
    target.chmod(0o600)
    (home / "audit.log").unlink()
    (home / "audit.log").symlink_to(target)
    return target


@contextmanager
def ext4_image(size: str = "8M") -> Iterator[Path]:
    """A small loop-mounted ext4 file system: there `chattr +i` makes even an already open
    file refuse writes (EPERM), which tmpfs does not enforce."""
    work = Path(tempfile.mkdtemp(prefix="sb-img-", dir="/tmp"))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mnt)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        shutil.rmtree(work, ignore_errors=True)
