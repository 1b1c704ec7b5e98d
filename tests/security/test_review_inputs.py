"""Findings of an outside review, each driven as the attacker or accident would: the
dashboard's login code read from another process's command line, oversized JSON on the
routes, absurd `max_tokens` against a daily budget, a stored value no header can carry,
and connections whose request headers never end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import service, usage
from broker.config import ConfigError, parse_config
from broker.metadata import Metadata
from tests.conftest import CANARY, Cli, wait_for
from tests.security.conftest import (
    PURPOSES,
    Broker,
    Reply,
    add_secrets,
    kill,
    launch,
    parse,
    provider_grants,
    request_bytes,
    start_standins,
    stop_standins,
)
from tests.support.standins import StandIn


@pytest.fixture(scope="module")
def shared(module_home: Cli) -> Iterator[Broker]:
    stands = start_standins(("openai", "google"))
    b = launch(module_home, stands)
    yield b
    kill(b.daemon)
    stop_standins(stands)


@pytest.fixture
def gw(shared: Broker) -> Broker:
    """The module's broker, alive, with the stand-ins' records cleared."""
    assert shared.daemon.proc.poll() is None, shared.log()
    for s in shared.standins.values():
        s.clear()
    return shared


def assert_no_handler_crashed(b: Broker) -> None:
    assert "Traceback" not in b.log() and '"internal.error"' not in b.log(), b.log()[-2000:]


def redeem(b: Broker, code: str) -> Reply:
    """Trade a login code at the dashboard's login route, as its page does."""
    return b.http("POST", "/ui/api/session", token=None, body=json.dumps({"code": code}).encode(),
                  headers=[("Content-Type", "application/json")])


# --- 1. the dashboard's login code is never in a command line or an environment ----------------

FAKE_BROWSER = """#!/bin/sh
# Records what it was asked to open, then stays open (as a browser would) until released.
printf '%s\\n' "$@" > "$0.opened"
i=0
while [ ! -e "$0.release" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
"""

# Run as its own process: what any local user can read of every other process.
SCANNER = r"""
import os, re
found = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    for part in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        found.update(m.decode() for m in re.findall(rb"code=([A-Za-z0-9_-]{20,})", data))
print("\n".join(sorted(found)))
"""


def test_ui_login_code_is_in_no_command_line_and_its_file_is_private(gw: Broker,
                                                                     tmp_path: Path) -> None:
    """While `ui` opens the browser, no code in any /proc cmdline or environ redeems; the
    browser gets a 0600 file in run/ that redirects to a link that works once."""
    run = gw.cli.home / "run"
    stale = run / "ui-stale.html"
    stale.write_text("old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    browser = tmp_path / "fake-browser"
    browser.write_text(FAKE_BROWSER)
    browser.chmod(0o700)
    opened = Path(f"{browser}.opened")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "ui"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
        env={**gw.cli.env, "BROWSER": str(browser), "DISPLAY": ":99"})
    try:
        wait_for(lambda: opened.exists() and opened.read_text().strip(), what="the browser")
        scanned = subprocess.run([sys.executable, "-c", SCANNER], capture_output=True,
                                 text=True, check=True, timeout=60).stdout.split()
        redeemed = [code for code in scanned if redeem(gw, code).status == 200]
        assert redeemed == [], "a login code read from /proc opened a dashboard session"
    finally:
        Path(f"{browser}.release").touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "#code=" not in out + err
    target = opened.read_text().strip()
    assert target.startswith("file://") and "code" not in target
    page = Path(target.removeprefix("file://"))
    assert page.parent == run and re.fullmatch(r"ui-[A-Za-z0-9_-]{16,}\.html", page.name)
    info = page.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    assert not stale.exists()  # an old page (its code long dead) is deleted
    found = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', page.read_text())
    assert found, page.read_text()
    url = found.group(1).replace("&amp;", "&")
    assert url.startswith(f"http://127.0.0.1:{gw.port}/ui/#code=")
    code = url.split("#code=")[1]
    assert code not in scanned
    first, again = redeem(gw, code), redeem(gw, code)
    assert first.status == 200 and first.json()["token"].startswith("sbs_")
    assert (again.status, again.code) == (401, "unauthorized")
    printed = gw.cli.ok("ui", "--print").strip()  # by hand, the owner still gets the link
    assert printed.startswith(f"http://127.0.0.1:{gw.port}/ui/#code=")
