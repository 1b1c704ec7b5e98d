"""Who owns a loopback TCP socket: the uid (and process) the kernel shows in /proc.

A loopback port is not private: while the broker is down, any local user may listen on
it and collect the tokens clients send there. So a client checks, before it sends a
token, that the end it reached belongs to its own uid; the dashboard checks that a login
code comes from the owner's uid; and `start` names whoever holds a busy port.

Linux only: elsewhere `read()` returns None ("cannot tell") and callers go without the
check. The parsing is pure; `read()` and `holder()` are the thin readers.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
LISTEN = "0A"  # TCP_LISTEN in the kernel's `st` column
UNSHOWN = -1  # far_end_uid(): the kernel shows no socket for that connection


@dataclass(frozen=True)
class Socket:
    """One row of /proc/net/tcp or tcp6."""

    local: Endpoint
    remote: Endpoint
    listening: bool
    uid: int
    inode: int


def _address(text: str) -> IPAddress:
    """The kernel writes each 32-bit word of an address in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(text[i:i + 8])[::-1] for i in range(0, len(text), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 peer of a dual-stack socket
    return address


def _endpoint(text: str) -> Endpoint:
    address, _, port = text.partition(":")
    return _address(address), int(port, 16)


def parse(text: str) -> list[Socket]:
    """The sockets in the text of /proc/net/tcp or /proc/net/tcp6 (header line skipped)."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        sockets.append(Socket(_endpoint(fields[1]), _endpoint(fields[2]), fields[3] == LISTEN,
                              int(fields[7]), int(fields[9])))
    return sockets


def endpoint(name: Sequence[object]) -> Endpoint:
    """A Python socket name ((host, port) or the IPv6 4-tuple) as an Endpoint."""
    address = ipaddress.ip_address(str(name[0]).split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(str(name[1]))


def connection(sockets: list[Socket], local: Endpoint, remote: Endpoint) -> Socket | None:
    """The socket of a connection, seen from its `local` end."""
    return next((s for s in sockets if not s.listening and s.local == local
                 and s.remote == remote), None)


def listener(sockets: list[Socket], port: int) -> Socket | None:
    """The socket listening on `port`, on any address."""
    return next((s for s in sockets if s.listening and s.local[1] == port), None)


def read() -> list[Socket] | None:
    """Every TCP socket on this machine, or None where the kernel does not show them."""
    sockets: list[Socket] = []
    found = False
    for table in TABLES:
        try:
            sockets += parse(table.read_text())
            found = True
        except FileNotFoundError:
            continue
    return sockets if found else None


def far_end_uid(local: Sequence[object], remote: Sequence[object]) -> int | None:
    """The uid of the socket at the other end of a connection on this machine, given the
    Python names of our end (getsockname, getpeername): None where the kernel does not show
    sockets, UNSHOWN where it shows none for this connection."""
    sockets = read()
    if sockets is None:
        return None
    found = connection(sockets, endpoint(remote), endpoint(local))
    return UNSHOWN if found is None else found.uid


def holder(sock: Socket) -> str:
    """Who holds a socket, for a message: the processes with it open (pid and command),
    where /proc shows them to us, and always its uid."""
    target = f"socket:[{sock.inode}]"
    held = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                command = (proc / "comm").read_text().strip()
                held.append(f"pid {proc.name} ({command})")
        except OSError:  # gone, or not ours to look at
            continue
    return ", ".join([*held, f"uid {sock.uid}"])
