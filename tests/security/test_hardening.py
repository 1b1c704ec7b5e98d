"""Process hardening on Linux, observed from outside: the daemon is non-dumpable and has no
core limit, so another process of the same (non-root) user cannot read its environment or
memory through /proc. Root is never the test subject: root may read anything.

The daemon runs as `nobody` via setpriv, keeping only CAP_DAC_READ_SEARCH so that it can
read this machine's interpreter (under /root); the reader and a control process get the
same uid and capability, so the only difference between them is dumpability.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.core.errors import BrokerNotRunning
from tests.conftest import Cli, wait_for

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
PROBE = """
import json, sys
out = {}
for name in ("environ", "mem", "cmdline"):
    try:
        with open(f"/proc/{sys.argv[1]}/{name}", "rb") as f:
            if name != "mem":  # mem at offset 0 is unmapped: opening it is the test
                f.read(1)
        out[name] = "read"
    except OSError as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""


def probe(pid: int) -> dict[str, str]:
    """What a same-uid process (nobody, same capabilities) can open under /proc/<pid>."""
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", PROBE, str(pid)],
                          capture_output=True, text=True, timeout=30, check=True)
    return dict(json.loads(done.stdout))


def proc_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


@pytest.fixture
def nobody_daemon(cli: Cli) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon serving this home as uid `nobody` (the home handed over to it)."""
    for path in [cli.home, *cli.home.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    log = (cli.home.parent / "nobody-daemon.log").open("wb")
    proc = subprocess.Popen([*AS_NOBODY, sys.executable, "-m", "broker", "serve", "--listen",
                             "127.0.0.1:0", "--log-format", "json"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=cli.env)
    unix = BrokerClient(socket_path=cli.home / "run" / "broker.sock", timeout=2.0)

    def answers() -> bool:
        assert proc.poll() is None, (cli.home.parent / "nobody-daemon.log").read_text()
        try:
            return unix.health()["status"] == "ok"
        except BrokerNotRunning:
            return False

    wait_for(answers, what="the daemon running as nobody")
    yield proc
    proc.kill()
    proc.wait()
    log.close()


def test_daemon_is_not_dumpable_and_keeps_no_core(nobody_daemon: subprocess.Popen[bytes]
                                                  ) -> None:
    """Same-user processes cannot open the daemon's /proc environ or mem; RLIMIT_CORE is 0."""
    control = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        daemon = nobody_daemon.pid
        wait_for(lambda: "python" in os.readlink(f"/proc/{control.pid}/exe"),
                 what="setpriv to exec the control process")
        assert proc_uid(daemon) == proc_uid(control.pid) == NOBODY
        # The kernel makes a non-dumpable process's /proc files root's, whoever runs it.
        assert os.stat(f"/proc/{daemon}/environ").st_uid == 0
        assert os.stat(f"/proc/{control.pid}/environ").st_uid == NOBODY
        assert probe(control.pid) == {"environ": "read", "mem": "read", "cmdline": "read"}
        denied = probe(daemon)
        assert denied["environ"] == denied["mem"] == "PermissionError"
        assert denied["cmdline"] == "read"  # cmdline stays public: it holds no secret
        limits = Path(f"/proc/{daemon}/limits").read_text().splitlines()
        core = next(line for line in limits if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
    finally:
        control.kill()
        control.wait()
