"""Review findings on the audit trail and on what reaches a terminal or a log:
control characters from requests, values quoted by config errors, cut-off audit logs."""

from __future__ import annotations

import re

import structlog

from broker import logs
from broker.text import printable
from tests.conftest import Cli, Daemon
from tests.security.conftest import exchange, request_bytes

# Raw controls a terminal acts on: ESC, CR, BEL, CSI (C1), NEL, bidi overrides, separators.
_RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                  "\u2028\u2029]")
_HOSTILE = "/v1/x%0d%1b[2K%1b]52;c;cHduZWQ=%07%c2%9b31m%e2%80%aeFAKE%20ROW%e2%80%a8%0a"


def _raw_controls(text: str) -> list[str]:
    """Every raw control character in the text, except line ends and tabs between lines."""
    return [c for line in text.split("\n") for c in _RAW.findall(line.replace("\t", " "))]


def test_printable_escapes_every_control_visibly() -> None:
    """C0, C1, DEL, bidi overrides and line separators become visible escapes; text stays."""
    assert printable("a\x1b[2Kb\r\n\x07\x9b\x7f\u202e\u2028é") == (
        "a\\x1b[2Kb\\r\\n\\x07\\x9b\\x7f\\u202e\\u2028é")
    assert printable("line\n\tnext", lines=True) == "line\n\tnext"


def test_console_log_renderer_escapes_controls() -> None:
    """The console renderer (the daemon on a terminal) prints no raw control, in the values
    (structlog quotes them) nor in the event text (printed as it is)."""
    logs.configure("console")
    try:
        processors = structlog.get_config()["processors"]
        event: object = {"event": "request\x1b[2K\u202e", "route": "/v1/x\r\x1b[2K\x9b\u202efake\n"}
        for processor in processors:
            event = processor(None, "info", event)  # type: ignore[arg-type]
        assert isinstance(event, str)
        assert _raw_controls(event.rstrip("\n")) == [], event
        assert "\\x1b[2K" in event
    finally:
        logs.configure("json")


def test_hostile_route_reaches_no_terminal(cli: Cli, daemon_factory: object) -> None:
    """A tokenless request with escapes in its path and Origin: 401/403, and neither
    `audit`, `audit --json` nor the console log carries a raw control character."""
    daemon: Daemon = daemon_factory("--log-format", "console")  # type: ignore[operator]
    raw = exchange(daemon.port, request_bytes(daemon.port, "GET", _HOSTILE))
    assert raw.startswith(b"HTTP/1.1 401"), raw[:100]
    # aiohttp refuses C0 in header values (400); C1 and UTF-8 bidi bytes pass its parser.
    origin = "http://x\x9b31m" + "\u202e".encode().decode("latin-1")
    raw = exchange(daemon.port, request_bytes(daemon.port, "GET", _HOSTILE,
                                              [("Origin", origin)]))
    assert raw.startswith(b"HTTP/1.1 403"), raw[:100]
    daemon.stop()
    text = (cli.home / "audit.log").read_text()
    assert "\\u001b[2K" in text  # the route is kept as sent, in JSON's escapes
    assert _raw_controls(text) == []  # `tail -f audit.log` is safe too
    table = cli.ok("audit")
    assert "auth.failed" in table and "request.refused" in table
    assert "\\x1b[2K" in table
    assert _raw_controls(table) == [], table
    assert _raw_controls(cli.ok("audit", "--json")) == []
    assert _raw_controls(daemon.log()) == [], daemon.log()
