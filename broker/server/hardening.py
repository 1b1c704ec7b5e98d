"""Process hardening for the daemon, and what manages it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys

PR_SET_DUMPABLE = 4


def apply() -> None:
    """No core dumps, and (Linux) no ptrace or /proc/<pid>/mem reads by same-user processes.
    Also lift the open-file soft limit to the hard one: each stream holds two sockets, and
    systemd's default soft limit of 1,024 would silently cap the broker at ~500 streams."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):  # keep what we have rather than fail
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def forget_passphrase() -> None:
    """Keep children from inheriting it. /proc/<pid>/environ still shows the value the
    process started with: that is why the docs recommend the file or credential paths."""
    os.environ.pop("SECRET_BROKER_PASSPHRASE", None)


def service_manager() -> str | None:
    if os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"):
        return "systemd"
    if os.environ.get("XPC_SERVICE_NAME", "0") not in ("0", ""):
        return "launchd"
    return None
