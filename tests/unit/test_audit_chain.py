"""broker.store.audit's pure core: sealing, verifying, --since parsing and filtering."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import clock
from broker.core.clock import rfc3339
from broker.core.errors import UsageError
from broker.store import audit

KEY = b"k" * 32
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def chain(events: list[tuple[str, dict[str, Any]]], key: bytes = KEY) -> list[bytes]:
    """Seal events into a chain, as the writer does."""
    lines: list[bytes] = []
    prev = audit.GENESIS
    for seq, (event, fields) in enumerate(events, start=1):
        line = audit.seal(key, seq=seq, prev=prev, ts=rfc3339(1_700_000_000 + seq),
                          event=event, actor="cli", fields=fields)
        lines.append(line)
        prev = audit.line_hash(line)
    return lines


def sealed(seq: int, mac: str) -> audit.Checkpoint:
    return seq, mac, audit.seal_checkpoint(KEY, seq, mac)


def checkpoint_of(lines: list[bytes]) -> audit.Checkpoint:
    return sealed(len(lines), json.loads(lines[-1])["mac"])


SAMPLE = chain([
    ("broker.initialized", {"backend": "file-vault"}),
    ("secret.added", {"secret_ref": "openai_api_key", "provider": "openai", "version": 1}),
    ("secret.rotated", {"secret_ref": "openai_api_key", "version": 2}),
    ("secret.exec", {"secret_ref": "openai_api_key", "env": "OPENAI_API_KEY"}),
    ("token.rotated", {}),
])


# --- seal -----------------------------------------------------------------------------------


def test_seal_layout() -> None:
    """A sealed line is compact JSON: ts, seq, event, actor, fields, prev, then mac last."""
    line = audit.seal(KEY, seq=1, prev=audit.GENESIS, ts="2026-01-01T00:00:00.000Z",
                      event="secret.added", actor="cli",
                      fields={"secret_ref": "a", "version": 1, "reason": None})
    record = json.loads(line)
    assert list(record) == ["ts", "seq", "event", "actor", "secret_ref", "version", "prev", "mac"]
    assert b" " not in line and b"\n" not in line
    assert record["prev"] == "0" * 64
    body = line[: line.rindex(b',"mac"')] + b"}"
    assert record["mac"] == audit._mac(KEY, body)


def test_seal_refuses_unknown_fields() -> None:
    """Only whitelisted fields may be written, so a value cannot slip in under another name."""
    with pytest.raises(ValueError, match="value"):
        audit.seal(KEY, seq=1, prev=audit.GENESIS, ts="t", event="e", actor="cli",
                   fields={"value": "sk-secret"})


def test_rfc3339_format() -> None:
    """Timestamps are UTC with milliseconds and a Z."""
    assert clock.rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert clock.rfc3339(1.2345) == "1970-01-01T00:00:01.234Z"
    assert TS_RE.fullmatch(clock.rfc3339())


# --- verify ------------------------------------------------------------------------------------


def test_intact_chain_verifies() -> None:
    """An untouched chain verifies with its checkpoint."""
    assert audit.verify(SAMPLE, KEY, checkpoint_of(SAMPLE)) == audit.Verdict(True, 5)


def test_empty_log_verifies() -> None:
    """No lines and no checkpoint is a valid (new) log."""
    assert audit.verify([], KEY, None) == audit.Verdict(True, 0)


def test_empty_log_with_checkpoint_is_cut() -> None:
    """A checkpoint with no lines means the whole log was cut away."""
    verdict = audit.verify([], KEY, sealed(3, "ab" * 32))
    assert not verdict.ok
    assert verdict.first_bad_line == 1


def test_wrong_key_fails_at_line_one() -> None:
    """Under another key the very first MAC fails."""
    verdict = audit.verify(SAMPLE, b"x" * 32, None)
    assert (verdict.ok, verdict.first_bad_line, verdict.checked) == (False, 1, 0)
    assert "MAC" in (verdict.reason or "")


def test_edited_field_fails_at_its_line() -> None:
    """Changing a field's value breaks that line's MAC."""
    lines = list(SAMPLE)
    lines[2] = lines[2].replace(b'"version":2', b'"version":9')
    verdict = audit.verify(lines, KEY, checkpoint_of(SAMPLE))
    assert (verdict.first_bad_line, verdict.checked) == (3, 2)
    assert "MAC" in (verdict.reason or "")


def test_deleted_line_breaks_chain_at_its_place() -> None:
    """Removing line 2 makes the following line (now line 2) fail the chain."""
    lines = SAMPLE[:1] + SAMPLE[2:]
    verdict = audit.verify(lines, KEY, checkpoint_of(SAMPLE))
    assert verdict.first_bad_line == 2
    assert "chain broken" in (verdict.reason or "")


def test_swapped_lines_fail_at_the_first() -> None:
    """Swapping lines 3 and 4 fails at line 3."""
    lines = list(SAMPLE)
    lines[2], lines[3] = lines[3], lines[2]
    assert audit.verify(lines, KEY, checkpoint_of(SAMPLE)).first_bad_line == 3


def test_reseal_without_key_fails_at_edited_line() -> None:
    """Recomputing every later prev after an edit does not help without the MAC key."""
    lines = list(SAMPLE)
    lines[1] = lines[1].replace(b'"provider":"openai"', b'"provider":"jina"')
    for i in range(2, len(lines)):
        record = json.loads(lines[i])
        lines[i] = lines[i].replace(record["prev"].encode(), audit.line_hash(lines[i - 1]).encode())
    assert audit.verify(lines, KEY, None).first_bad_line == 2


def test_reseal_with_other_key_fails_at_first_resealed_line() -> None:
    """Re-sealing from line 3 on under a guessed key fails at line 3."""
    forged = chain([(json.loads(x)["event"], {}) for x in SAMPLE], key=b"guess" * 8)
    lines = SAMPLE[:2] + forged[2:]
    assert audit.verify(lines, KEY, None).first_bad_line == 3


def test_cut_tail_caught_by_checkpoint() -> None:
    """Cutting the last two lines names the first missing line."""
    verdict = audit.verify(SAMPLE[:3], KEY, checkpoint_of(SAMPLE))
    assert (verdict.ok, verdict.first_bad_line, verdict.checked) == (False, 4, 3)
    assert "cut off" in (verdict.reason or "")


def test_checkpoint_mac_mismatch() -> None:
    """A line at the checkpoint's seq with another MAC (a different, valid history) fails."""
    verdict = audit.verify(SAMPLE, KEY, sealed(3, "0" * 64))
    assert (verdict.ok, verdict.first_bad_line) == (False, 3)


def test_checkpoint_behind_the_log_is_fine() -> None:
    """A checkpoint older than the log's end (batch mode, not yet flushed) still verifies."""
    assert audit.verify(SAMPLE, KEY, checkpoint_of(SAMPLE[:3])).ok


def test_sequence_gap_is_caught() -> None:
    """A correctly sealed and chained line whose seq skips is refused."""
    first = audit.seal(KEY, seq=1, prev=audit.GENESIS, ts="t", event="a", actor="cli", fields={})
    second = audit.seal(KEY, seq=3, prev=audit.line_hash(first), ts="t", event="b",
                        actor="cli", fields={})
    verdict = audit.verify([first, second], KEY, None)
    assert verdict.first_bad_line == 2
    assert "sequence jumps from 1 to 3" in (verdict.reason or "")


@pytest.mark.parametrize("junk", [b"", b"not json", b'{"seq":1}', b"{}"])
def test_unsealed_line(junk: bytes) -> None:
    """A line without a MAC tail is reported as not sealed."""
    verdict = audit.verify([SAMPLE[0], junk], KEY, None)
    assert verdict.first_bad_line == 2
    assert "not a sealed" in (verdict.reason or "")


_FIELD_VALUES = st.one_of(st.text(max_size=12), st.integers(-5, 10**6), st.none())


@settings(deadline=None)  # no timing flakes on a loaded machine
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["secret.added", "secret.exec", "lease.issued", "proxy.request"]),
            st.dictionaries(st.sampled_from(audit.FIELDS), _FIELD_VALUES, max_size=4),
        ),
        min_size=1, max_size=6,
    ),
    where=st.tuples(st.integers(min_value=0), st.integers(min_value=0)),
    delta=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_change_is_detected(events: list[tuple[str, dict[str, Any]]],
                                            where: tuple[int, int], delta: int) -> None:
    """Changing any one byte of any line of a random chain fails verify at that very line."""
    lines = chain(events)
    index = where[0] % len(lines)
    line = bytearray(lines[index])
    offset = where[1] % len(line)
    line[offset] = (line[offset] + delta) % 256
    tampered = [*lines[:index], bytes(line), *lines[index + 1 :]]
    verdict = audit.verify(tampered, KEY, checkpoint_of(lines))
    assert not verdict.ok
    assert verdict.first_bad_line == index + 1


@settings(deadline=None)  # no timing flakes on a loaded machine
@given(cut=st.integers(min_value=1, max_value=5))
def test_any_tail_cut_is_detected(cut: int) -> None:
    """Dropping 1..5 lines off the end fails at the first dropped line."""
    kept = SAMPLE[: len(SAMPLE) - cut]
    assert audit.verify(kept, KEY, checkpoint_of(SAMPLE)).first_bad_line == len(kept) + 1


# --- parse_since ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("0m", 0),
])
def test_parse_since_durations(text: str, seconds: int) -> None:
    """A duration means that long before now."""
    before = time.time()
    got = audit.parse_since(text)
    assert before - seconds - 1 <= got <= time.time() - seconds


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-01-31T12:00:00Z", datetime(2026, 1, 31, 12, tzinfo=UTC)),
    ("2026-01-31T12:00:00.250Z", datetime(2026, 1, 31, 12, 0, 0, 250000, tzinfo=UTC)),
    ("2026-01-31T14:00:00+02:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),
    ("2026-01-31T12:00:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),  # naive = UTC
    ("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC)),
])
def test_parse_since_times(text: str, expected: datetime) -> None:
    """RFC 3339 times and dates parse; a time without a zone is UTC."""
    assert audit.parse_since(text) == expected.timestamp()


@pytest.mark.parametrize("text", ["", "yesterday", "30", "30w", "-5m", "2026-13-01", "5 m"])
def test_parse_since_refuses_garbage(text: str) -> None:
    """Anything else is a usage error that shows the accepted forms."""
    with pytest.raises(UsageError, match="30m, 12h, 7d"):
        audit.parse_since(text)


# --- matches -------------------------------------------------------------------------------------

RECORD = {"ts": "2026-01-31T12:00:00.000Z", "event": "secret.rotated", "secret_ref": "a"}


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, True),
    ({"ref": "a"}, True),
    ({"ref": "b"}, False),
    ({"event": "secret.rotated"}, True),
    ({"event": "secret.added"}, False),
    ({"event": "secret."}, True),
    ({"event": "secret"}, False),
    ({"event": "secret.rot"}, False),
    ({"event": "lease."}, False),
    ({"since": datetime(2026, 1, 31, 12, tzinfo=UTC).timestamp()}, True),
    ({"since": datetime(2026, 1, 31, 12, 0, 0, 1000, tzinfo=UTC).timestamp()}, False),
    ({"since": datetime(2026, 1, 31, 11, tzinfo=UTC).timestamp()}, True),
    ({"ref": "a", "event": "secret.", "since": 0.0}, True),
    ({"ref": "a", "event": "token.", "since": 0.0}, False),
])
def test_matches(kw: dict[str, Any], expected: bool) -> None:
    """Filters combine with AND; an event ending in '.' is a prefix."""
    args: dict[str, Any] = {"ref": None, "event": None, "since": None, **kw}
    assert audit.matches(RECORD, **args) is expected


@pytest.mark.parametrize("record", [{"event": "x"}, {"event": "x", "ts": "garbage"}])
def test_matches_since_without_valid_ts(record: dict[str, Any]) -> None:
    """A record with no readable time never matches a --since filter."""
    assert not audit.matches(record, ref=None, event=None, since=0.0)


def test_read_events_skips_damaged_lines(tmp_path: Path) -> None:
    """Listing reads what it can; damaged lines are left to `audit verify`."""
    path = tmp_path / "audit.log"
    path.write_bytes(SAMPLE[0] + b"\n{broken\n" + SAMPLE[1] + b"\n")
    assert [e["seq"] for e in audit.read_events(path)] == [1, 2]
    assert list(audit.read_events(tmp_path / "missing.log")) == []


# --- the writer's batch ---------------------------------------------------------------------


def test_a_batch_is_one_write_that_chains_like_single_appends(tmp_path: Path) -> None:
    """append_many seals each event after the one before it, in one write; the result
    verifies, and a later single append (another writer's, say) continues the chain."""
    path = tmp_path / "audit.log"
    checkpoints: list[tuple[int, str]] = []
    log = audit.AuditLog(path, KEY, lambda seq, mac, _seal: checkpoints.append((seq, mac)))
    log.append("broker.started", "broker", pid=1)
    written = log.append_many([("proxy.request", {"status": 200}),
                               ("proxy.request", {"status": 502})], "broker")
    assert [w["seq"] for w in written] == [2, 3]
    other = audit.AuditLog(path, KEY, lambda *_: None)
    other.append("secret.added", "cli", secret_ref="a")
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["event"] for line in lines] == [
        "broker.started", "proxy.request", "proxy.request", "secret.added"]
    assert checkpoints[-1] == (3, json.loads(lines[2])["mac"])
    assert audit.verify(lines[:3], KEY, sealed(*checkpoints[-1])).ok


def test_a_batch_with_a_bad_event_writes_none_of_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = audit.AuditLog(path, KEY, lambda *_: None)
    log.append("broker.started", "broker")
    with pytest.raises(ValueError, match="not allowed"):
        log.append_many([("proxy.request", {"status": 200}), ("x", {"body": "canary"})],
                        "broker")
    assert len(path.read_bytes().splitlines()) == 1
    assert log.append("broker.stopped", "broker")["seq"] == 2
