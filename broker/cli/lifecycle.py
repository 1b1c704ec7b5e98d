"""`start`, `stop` and `status`: the background daemon seen from the command line."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from broker.client import BrokerClient
from broker.core.errors import BrokerError, BrokerNotRunning
from broker.core.home import Home, open_private, private_dir, without_broker_vars
from broker.store import envelope
from broker.store.vault import HEADER, passphrase_source, read_passphrase

POLL = 0.05
# What `serve` reads from the environment; the owner's tokens and export passphrase stay out.
DAEMON_VARS = ("SECRET_BROKER_HOME", "SECRET_BROKER_KEY_FILE", "SECRET_BROKER_PASSPHRASE_FILE",
               "SECRET_BROKER_DEBUG", "CREDENTIALS_DIRECTORY")


def running_pid(home: Home) -> int | None:
    """The daemon's pid, judged by its lock on the pid file (a stale file holds no lock);
    with no lock there, the pid of a daemon still answering on the socket (its pid file was
    deleted, and the lock with it)."""
    try:
        fd = open_private(home.pid, os.O_RDONLY)
    except FileNotFoundError:
        return _answering_pid(home)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)
    return _answering_pid(home)


def _answering_pid(home: Home) -> int | None:
    try:
        return int(BrokerClient(socket_path=home.socket, timeout=2.0).status()["pid"])
    except BrokerNotRunning:
        return None


def _needs_passphrase(home: Home) -> bool:
    try:
        header = envelope.load_header((home.vault / HEADER).read_bytes())
    except (FileNotFoundError, envelope.EnvelopeError):
        return False
    return header.unlock == "passphrase"


def _log_tail(home: Home, lines: int = 15) -> str:
    try:
        return "\n".join(home.log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(home: Home, *, listen: str | None, timeout: float,
          workers: int | str | None = None) -> int:
    home.require()
    private_dir(home.run)  # before anything in it is opened
    pid = running_pid(home)
    if pid is not None:
        print(f"the broker is already running (pid {pid})")
        return 0
    env = without_broker_vars(os.environ, keep=DAEMON_VARS)
    pass_fds: tuple[int, ...] = ()
    if _needs_passphrase(home) and (passphrase_source(os.environ) == "env" or
                                     passphrase_source(os.environ) is None):
        # Hand the passphrase over a pipe, never through the daemon's environment.
        secret = read_passphrase(os.environ)
        read_end, write_end = os.pipe()
        os.write(write_end, secret)
        os.close(write_end)
        pass_fds = (read_end,)
        env["SECRET_BROKER_PASSPHRASE_FILE"] = f"/dev/fd/{read_end}"
    argv = [sys.executable, "-m", "broker", "serve", "--log-format", "json"]
    if listen:
        argv += ["--listen", listen]
    if workers is not None:
        argv += ["--workers", str(workers)]
    log = open_private(home.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, pass_fds=pass_fds, start_new_session=True)
    finally:
        os.close(log)
    for fd in pass_fds:
        os.close(fd)
    client = BrokerClient(socket_path=home.socket, timeout=2.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"the broker exited at start (code {proc.returncode}); the end of "
                              f"{home.log}:\n{_log_tail(home)}")
        try:
            answering = client.status()["pid"]  # not proc.pid: the one that answers
        except BrokerNotRunning:
            time.sleep(POLL)
            continue
        print(f"broker running (pid {answering}); socket {home.socket}; log {home.log}")
        return 0
    proc.terminate()
    raise BrokerError(f"the broker did not answer within {timeout:g} s; the end of "
                      f"{home.log}:\n{_log_tail(home)}")


def stop(home: Home, *, timeout: float) -> int:
    pid = running_pid(home)
    if pid is None:
        raise BrokerNotRunning(f"the broker is not running for {home.root}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(home) is None:
            print(f"broker stopped (pid {pid})")
            return 0
        time.sleep(POLL)
    raise BrokerError(f"the broker (pid {pid}) did not stop within {timeout:g} s; "
                      f"`kill {pid}` again, or `kill -9 {pid}` as a last resort")


def _config_line(config: dict[str, object], pid: object) -> str:
    """config.toml as the daemon has it: an edit waits for SIGHUP, some keys for a restart."""
    line = f"config:  loaded {config['loaded_at']}"
    if config.get("changed_since_load"):
        line += f"\n         changed since it was loaded: `kill -HUP {pid}` reloads it"
    restart = config.get("restart_needed")
    if isinstance(restart, list) and restart:
        line += f"\n         a restart applies: {', '.join(map(str, restart))}"
    return line


def status(home: Home, *, as_json: bool) -> int:
    if running_pid(home) is None:
        if as_json:
            print(json.dumps({"status": "stopped", "home": str(home.root)}))
        fix = "start it with `secret-broker start`" if home.config.exists() else (
            "there is no home there yet: run `secret-broker init`, then `secret-broker start`")
        raise BrokerNotRunning(f"the broker is not running for {home.root}; {fix}")
    doc = BrokerClient(socket_path=home.socket, timeout=5.0).status()
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    grants = doc["grants"]
    several = doc.get("workers", 1) > 1
    print(f"running: pid {doc['pid']}" + (f", {doc['workers']} workers" if several else "")
          + f", version {doc['version']}, up {doc['uptime_secs']} s"
          + (f", under {doc['service_manager']}" if doc.get("service_manager") else ""))
    print(f"listen:  {doc['listen']} (token) and {doc['socket']}")
    print(f"store:   {doc['backend']}")
    print(f"grants:  {'valid' if grants['valid'] else 'INVALID (denying everything)'}, "
          f"{grants['count']} grant(s), loaded {grants['loaded_at']}"
          + (f"\n         {grants['error']}" if grants.get("error") else ""))
    print(f"leases:  {doc['leases']['active']} active")
    print(_config_line(doc["config"], doc["pid"]))
    counted = f" (worker {doc['worker_pid']})" if several else ""
    print(f"requests{counted}: " + " ".join([str(sum(doc["requests"].values())), *(
        f"{k}={v}" for k, v in sorted(doc["requests"].items()))]))
    return 0
