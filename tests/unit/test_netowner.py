"""Reading /proc/net/tcp and tcp6: who owns a listener, and each end of a connection."""

from __future__ import annotations

from ipaddress import ip_address

from broker.core import netowner

HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  " \
       "timeout inode\n"
TAIL = " 1 0000000000000000 100 0 0 10 0"
TCP = HEAD + "\n".join([
    "   0: 0100007F:A7C3 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534 "
    "       0 77119" + TAIL,
    "   1: 0100007F:A7C3 0100007F:E7FC 01 00000000:00000000 00:00000000 00000000 65534 "
    "       0 0" + TAIL,
    "   2: 0100007F:E7FC 0100007F:A7C3 01 00000000:00000000 00:00000000 00000000     0 "
    "       0 77120" + TAIL,
    "   3: 0201007F:E7FC 0100007F:A7C3 01 00000000:00000000 00:00000000 00000000  1000 "
    "       0 77121" + TAIL,
]) + "\n"
TCP6 = HEAD + "\n".join([
    "   0: 00000000000000000000000001000000:4823 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1000        0 88001" + TAIL,
    "   1: 0000000000000000FFFF00000100007F:4823 0000000000000000FFFF00000100007F:D431 01 "
    "00000000:00000000 00:00000000 00000000  1000        0 88002" + TAIL,
]) + "\n"
LOOPBACK = ip_address("127.0.0.1")


def test_rows_are_parsed_with_their_addresses_state_uid_and_inode() -> None:
    """Little-endian IPv4 words become 127.0.0.1; LISTEN (0A) is told apart; bad rows skip."""
    rows = netowner.parse(TCP + "   9: garbage\n")
    assert len(rows) == 4
    assert rows[0] == netowner.Socket((LOOPBACK, 0xA7C3), (ip_address(0), 0), True,
                                      65534, 77119)
    assert rows[3].local == (ip_address("127.0.1.2"), 0xE7FC) and not rows[3].listening


def test_ipv6_rows_are_parsed_and_mapped_ipv4_is_plain_ipv4() -> None:
    """::1 reads as ::1; ::ffff:127.0.0.1 (an IPv4 peer of a dual-stack socket) as IPv4."""
    listen, conn = netowner.parse(TCP6)
    assert listen.local == (ip_address("::1"), 0x4823) and listen.listening
    assert conn.local == (LOOPBACK, 0x4823) and conn.remote == (LOOPBACK, 0xD431)


def test_the_listener_of_a_port_is_found_on_any_address() -> None:
    """The LISTEN row for the port, never a connection that uses it; None when nobody."""
    rows = netowner.parse(TCP) + netowner.parse(TCP6)
    assert netowner.listener(rows, 0xA7C3) == rows[0]
    assert netowner.listener(rows, 0x4823) == rows[4]
    assert netowner.listener(rows, 0xE7FC) is None


def test_a_connection_is_found_by_both_of_its_ends() -> None:
    """Local and remote (address and port) must both match: the server's end has the
    listener's uid, the client's end its own, and another address is another socket."""
    rows = netowner.parse(TCP)
    server, client = (LOOPBACK, 0xA7C3), (LOOPBACK, 0xE7FC)
    assert netowner.connection(rows, server, client) == rows[1]
    assert netowner.connection(rows, client, server) == rows[2]
    assert netowner.connection(rows, (ip_address("127.0.1.2"), 0xE7FC), server) == rows[3]
    assert netowner.connection(rows, server, (LOOPBACK, 1)) is None


def test_python_socket_names_become_endpoints() -> None:
    """getsockname()'s IPv4 pair and IPv6 4-tuple (mapped IPv4 included) compare as rows do."""
    assert netowner.endpoint(("127.0.0.1", 80)) == (LOOPBACK, 80)
    assert netowner.endpoint(("::ffff:127.0.0.1", 80, 0, 0)) == (LOOPBACK, 80)
    assert netowner.endpoint(("::1", 443, 0, 0)) == (ip_address("::1"), 443)
