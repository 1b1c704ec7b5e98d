"""Review findings on the audit trail and on what reaches a terminal or a log:
control characters from requests, values quoted by config errors, cut-off audit logs."""

from __future__ import annotations

import json
import re
import signal
import sqlite3

import structlog

from broker.core import logs
from broker.core.text import printable
from broker.store import audit
from tests.conftest import CANARY, Cli, Daemon, wait_for, write_grants
from tests.support.gateway import exchange, request_bytes

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


# --- config errors never quote a value ---------------------------------------------------

_PASTED = CANARY.replace("-", "_")  # a key pasted where a ref belongs: a valid-looking word


def _grants_with_canary() -> str:
    """Every grants check that looks at a value, each failing on a pasted key."""
    return (f'[[grants]]\nsecret_ref = "{CANARY} "\nconsumer = " {CANARY}"\n'
            f'purposes = ["{CANARY} "]\ndelivery = ["{CANARY}"]\n'
            f'allowed_hosts = ["https://{CANARY}", "{CANARY}/x", "*.{CANARY}", "{CANARY}:0",'
            f' "[{CANARY}]", "{CANARY}é", "{CANARY} x", "1.2.{_PASTED}9", "a:{CANARY}:b"]\n'
            f'ttl_secs = 0\n\n[[grants]]\nsecret_ref = "{CANARY}!"\nconsumer = "c"\n'
            'purposes = ["p"]\ndelivery = ["env"]\nallowed_hosts = ["a.b"]\nttl_secs = 1\n')


def test_grants_errors_name_line_and_key_not_value(cli: Cli) -> None:
    """A key pasted into every grants field: `grants check` and `check` name the line and
    key of each problem, and print the value nowhere."""
    write_grants(cli.home, _grants_with_canary())
    checked = cli("grants", "check")
    assert checked.returncode == 1
    for where in ("line 2", "key 'secret_ref'", "line 3", "key 'consumer'", "line 6",
                  "key 'allowed_hosts'", "entry 9", "key 'ttl_secs'", "line 10"):
        assert where in checked.stderr, (where, checked.stderr)
    assert CANARY not in checked.stdout + checked.stderr
    doctor = cli("check")
    assert "grants" in doctor.stdout + doctor.stderr
    assert CANARY not in doctor.stdout + doctor.stderr
    assert _PASTED not in doctor.stdout + doctor.stderr


def test_config_errors_name_key_not_value(cli: Cli) -> None:
    """A key pasted as a header name or a route path in config.toml: the error names the
    key, never the value."""
    config = cli.home / "config.toml"
    original = config.read_text()
    for table in (f'auth = {{ header = "{CANARY}:", format = "{{key}}" }}',
                  f'routes = [{{ method = "GET", path = "../{CANARY}", purpose = "p" }}]'):
        config.write_text(f"{original}\n[providers.openai]\n{table}\n")
        proc = cli("check")
        assert "config.toml" in proc.stdout + proc.stderr
        assert CANARY not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_daemon_reload_of_bad_grants_logs_no_value(cli: Cli, daemon_factory: object) -> None:
    """A running daemon reloading grants with pasted keys: status, its log and audit.log
    name the problems but hold none of the values."""
    daemon: Daemon = daemon_factory()  # type: ignore[operator]
    write_grants(cli.home, _grants_with_canary())
    daemon.proc.send_signal(signal.SIGHUP)
    status = wait_for(lambda: (s := cli.ok("status")) and "INVALID" in s and s,
                      what="the daemon to report the grants invalid")
    assert "line 2" in status and CANARY not in status
    daemon.stop()
    audit_text = (cli.home / "audit.log").read_text()
    assert "grants.invalid" in audit_text and "line 2" in audit_text
    for text in (audit_text, daemon.log()):
        assert CANARY not in text and _PASTED not in text


# --- a cut-off audit log with its checkpoint edited or deleted -----------------------------


def _cut(cli: Cli, lines: int) -> dict[str, object]:
    """Cut the last lines off audit.log, as an attacker hiding what they did; the new last
    line's record."""
    log = cli.home / "audit.log"
    kept = log.read_bytes().splitlines(keepends=True)[:-lines]
    log.write_bytes(b"".join(kept))
    return json.loads(kept[-1])


def _sql(cli: Cli, statement: str, *args: object) -> None:
    with sqlite3.connect(cli.home / "metadata.db") as db:
        db.execute(statement, args)


def _verify_fails(cli: Cli, why: str) -> None:
    proc = cli("audit", "verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert why in proc.stderr, proc.stderr
    doctor = cli("check")
    assert doctor.returncode == 1 and "error: audit:" in doctor.stdout, doctor.stdout


def _add_three(cli: Cli) -> None:
    for n in range(3):
        cli.add(f"key_{n}", CANARY)


def test_cut_with_checkpoint_moved_to_new_end_is_caught(cli: Cli) -> None:
    """Cut two lines and point metadata.db's checkpoint at the new last line by hand: the
    seal no longer matches; later writes do not paper over it."""
    _add_three(cli)
    last = _cut(cli, 2)
    _sql(cli, "UPDATE meta SET value = ? WHERE key = 'audit_seq'", str(last["seq"]))
    _sql(cli, "UPDATE meta SET value = ? WHERE key = 'audit_mac'", last["mac"])
    _verify_fails(cli, "was edited: lines may have been cut off the end")
    cli.add("after", CANARY)
    _verify_fails(cli, "was edited")


def test_checkpoint_seq_that_is_no_number_is_reported_not_a_crash(cli: Cli) -> None:
    """A checkpoint seq edited to text: verify reports the edit, and appends still work."""
    _sql(cli, "UPDATE meta SET value = 'x' WHERE key = 'audit_seq'")
    cli.add("after", CANARY)
    _verify_fails(cli, "was edited")


def test_cut_with_checkpoint_deleted_is_caught(cli: Cli) -> None:
    """Cut two lines and delete the checkpoint: a log without one is a failure, not
    "nothing to compare", and later writes do not create a fresh one."""
    _add_three(cli)
    _cut(cli, 2)
    _sql(cli, "DELETE FROM meta WHERE key LIKE 'audit_%'")
    _verify_fails(cli, "holds no audit checkpoint")
    cli.add("after", CANARY)
    _verify_fails(cli, "holds no audit checkpoint")


def test_unsealed_checkpoint_of_an_older_home_needs_reseal(cli: Cli) -> None:
    """A checkpoint from before sealing (or with its seal deleted) fails verify with the fix;
    `audit verify --reseal` seals the log's end, records that, and verify passes again."""
    _add_three(cli)
    _sql(cli, "DELETE FROM meta WHERE key = 'audit_seal'")
    _verify_fails(cli, "is not sealed")
    assert "audit verify --reseal" in cli("audit", "verify").stderr
    cli.add("after", CANARY)  # the writer does not seal it on its own
    _verify_fails(cli, "is not sealed")
    assert "audit log OK: 5 events" in cli.ok("audit", "verify", "--reseal")
    assert "audit log OK: 6 events" in cli.ok("audit", "verify")
    assert "audit.resealed" in cli.ok("audit", "--event", "audit.")
    cli.add("later", CANARY)
    assert "audit log OK: 7 events" in cli.ok("audit", "verify")


def test_reseal_refuses_an_edited_line(cli: Cli) -> None:
    """--reseal trusts only a log whose every line holds: an edited line stays reported."""
    _add_three(cli)
    log = cli.home / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"key_1"', b'"key_9"'))
    proc = cli("audit", "verify", "--reseal")
    assert proc.returncode == 1 and "line 3: MAC mismatch" in proc.stderr, proc.stderr


def test_verify_needs_a_sealed_checkpoint_for_any_line() -> None:
    """An empty log with no checkpoint is a new log; any line without one is not."""
    key = b"k" * 32
    line = audit.seal(key, seq=1, prev=audit.GENESIS, ts="t", event="e", actor="cli", fields={})
    assert audit.verify([], key, None).ok
    assert not audit.verify([line], key, None).ok
    assert audit.verify([line], key, (1, line[-66:-2].decode(),
                                      audit.seal_checkpoint(key, 1, line[-66:-2].decode()))).ok
