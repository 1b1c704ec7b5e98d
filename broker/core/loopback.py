"""Loopback host names: which a browser or client may send, and whether a host is loopback."""

from __future__ import annotations

import functools
import ipaddress

# The names the dashboard answers to, as a Host header spells them; any other loopback
# address (127.0.0.0/8, ::1) is recognised by `is_loopback_host` through its address.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


@functools.lru_cache(maxsize=256)  # asked on every request, with a handful of distinct values
def is_loopback_host(host: str | None) -> bool:
    """A Host header, peer address or listen host (with or without a port) is loopback."""
    if not host:
        return False
    name = host.lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False
