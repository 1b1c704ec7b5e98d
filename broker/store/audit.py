"""The append-only, hash-chained, MAC-sealed audit log.

Chaining, sealing and verifying are pure functions over bytes; `AuditLog` is the thin
writer that adds the file lock, the append and the fsync policy.

A line is compact JSON: `ts, seq, event, actor, <fields>, prev, mac`, where `prev` is the
SHA-256 of the previous line's bytes and `mac` an HMAC-SHA256 of the line without `mac`
under a key kept in the secret store. The newest (seq, mac) is also checkpointed in
metadata.db, sealed under the same key, so cutting lines off the end is caught even when
the checkpoint is edited or deleted with them.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.core.clock import parse_duration, rfc3339
from broker.core.errors import AuditUnavailable, UsageError

GENESIS = "0" * 64
# Only these fields may be written, so no value, token or body can slip into the log.
FIELDS = (
    "secret_ref", "consumer", "purpose", "delivery", "lease_id", "provider", "route", "host",
    "status", "outcome", "reason", "duration_ms", "bytes_out", "version", "backend", "kind",
    "token_id", "peer", "count", "model", "input_tokens", "output_tokens", "env", "pid",
    "tool",
    # team vaults: which team, commit and member; public keys and file names, never a value
    "team", "team_id", "commit", "previous", "fingerprint", "member", "role", "group", "groups",
    "refs", "rule", "file", "recipient", "signer",
)
MIN_FREE_BYTES = 64 * 1024  # room for a few hundred events; below it, refuse instead
_MAC_TAIL = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')
_CHECKPOINT_DOMAIN = b"secret-broker audit checkpoint v1\n"
# The newest (seq, mac) and its seal; the seal is None in a home from before sealing.
Checkpoint = tuple[int, str, str | None]
_RESEAL = "once the log is trusted, run `secret-broker audit verify --reseal`"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _mac(key: bytes, body: bytes) -> str:
    return hmac.digest(key, body, "sha256").hex()


def seal_checkpoint(key: bytes, seq: int, mac: str) -> str:
    """The checkpoint's own MAC, so metadata.db's (seq, mac) cannot be moved back by hand."""
    return _mac(key, _CHECKPOINT_DOMAIN + f"{seq}\n{mac}".encode())


def seal(key: bytes, *, seq: int, prev: str, ts: str, event: str, actor: str,
         fields: dict[str, Any]) -> bytes:
    """One sealed line (without its newline)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"audit fields not allowed: {sorted(unknown)}")
    record: dict[str, Any] = {"ts": ts, "seq": seq, "event": event, "actor": actor}
    record.update((k, v) for k, v in fields.items() if v is not None)
    record["prev"] = prev
    body = json.dumps(record, separators=(",", ":")).encode()  # ASCII: safe to `tail`
    return body[:-1] + b',"mac":"' + _mac(key, body).encode() + b'"}'


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    first_bad_line: int | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        """What `audit verify --json` prints and the admin API's audit/verify answers."""
        return {"ok": self.ok, "checked": self.checked, "first_bad_line": self.first_bad_line,
                "reason": self.reason}


def _line_problem(line: bytes, key: bytes, prev: str, seq: int) -> str | None:
    """What is wrong with a line expected to be number `seq` after `prev`, if anything."""
    m = _MAC_TAIL.search(line)
    if m is None:
        return "line is not a sealed audit record"
    if not hmac.compare_digest(_mac(key, line[: m.start()] + b"}"), m.group(1).decode()):
        return "MAC mismatch: the line was edited or re-sealed"
    try:
        record = json.loads(line)
    except ValueError:
        return "line is not valid JSON"
    if record.get("prev") != prev:
        return "chain broken: a line before it was removed, reordered or edited"
    if record.get("seq") != seq:
        return f"sequence jumps from {seq - 1} to {record.get('seq')}"
    return None


def _chain(lines: Iterable[bytes], key: bytes, at: int | None
           ) -> tuple[Verdict | None, int, str | None, str | None]:
    """Check MACs, the chain and seq order: the first failure (or None), the number of
    lines, the MAC of line `at` and that of the last line."""
    prev, n = GENESIS, 0
    mac_at = mac = None
    for n, line in enumerate(lines, start=1):
        reason = _line_problem(line, key, prev, n)
        if reason is not None:
            return Verdict(False, n - 1, n, reason), n, None, None
        prev, mac = line_hash(line), line[-66:-2].decode()
        if n == at:
            mac_at = mac
    return None, n, mac_at, mac


def verify(lines: Iterable[bytes], key: bytes, checkpoint: Checkpoint | None) -> Verdict:
    """Check MACs, the chain, seq order and the sealed checkpoint; name the first bad line.
    A non-empty log needs a checkpoint: deleting it must not hide a cut."""
    failure, n, at_checkpoint, _ = _chain(lines, key, None if checkpoint is None
                                          else checkpoint[0])
    if failure is not None:
        return failure
    if checkpoint is None:
        if n:
            return Verdict(False, n, n + 1, "metadata.db holds no audit checkpoint: it was "
                                            "deleted, and lines may have been cut off the "
                                            f"end; {_RESEAL}")
        return Verdict(True, 0)
    seq, mac, sealed = checkpoint
    if sealed is None:
        return Verdict(False, n, n + 1, "the audit checkpoint in metadata.db is not sealed "
                                        f"(written by an older version, or edited); {_RESEAL}")
    if not hmac.compare_digest(sealed, seal_checkpoint(key, seq, mac)):
        return Verdict(False, n, n + 1, "the audit checkpoint in metadata.db was edited: "
                                        f"lines may have been cut off the end; {_RESEAL}")
    if seq > n:
        return Verdict(False, n, n + 1,
                       f"log ends at seq {n} but seq {seq} was recorded: "
                       "lines were cut off the end")
    if at_checkpoint != mac:
        return Verdict(False, n, seq, "line differs from the recorded checkpoint")
    return Verdict(True, n)


def resealed(lines: Iterable[bytes], key: bytes
             ) -> tuple[Verdict, tuple[int, str, str] | None]:
    """The log's verdict leaving the checkpoint aside, and a sealed checkpoint at its end
    (None for an empty log): to trust the log as it is now, once its lines all hold."""
    failure, n, _, last = _chain(lines, key, None)
    if failure is not None:
        return failure, None
    return Verdict(True, n), None if last is None else (n, last, seal_checkpoint(key, n, last))


def parse_since(text: str) -> float:
    """`--since`: an RFC 3339 time, a date, or a duration ago like 30m, 12h, 7d."""
    ago = parse_duration(text)
    if ago is not None:
        return time.time() - ago
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r}: use a duration (30m, 12h, 7d) or a time (2026-01-31T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def read_events(path: Path, *, newest_first: bool = False) -> Iterator[dict[str, Any]]:
    for line in read_lines_backwards(path) if newest_first else read_lines(path):
        try:
            yield json.loads(line)
        except ValueError:
            continue  # `audit verify` reports damaged lines; listing skips them


def read_lines(path: Path, end: int | None = None) -> Iterator[bytes]:
    """The file's lines, stopping at byte `end` when given (see `appends_held`)."""
    left = end
    try:
        with path.open("rb") as fh:
            for raw in fh:
                if left is not None:
                    if left <= 0:
                        return
                    raw, left = raw[:left], left - len(raw)
                yield raw.rstrip(b"\n")
    except FileNotFoundError:
        return


@contextmanager
def appends_held(path: Path) -> Iterator[int]:
    """Hold appends off and give the log's length, to read with its checkpoint as one.

    An appender holds the lock from its write to its checkpoint: read without it, a line
    half written, or one appended between reading the lines and the checkpoint, would read
    as tampering. Keep the block short: a daemon's appends wait for it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield 0
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_lines_backwards(path: Path, block: int = 65536) -> Iterator[bytes]:
    """The file's lines, newest first, read in blocks from its end: the newest events of a
    large log cost a block or two, never the whole file in memory."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        pos, tail = fh.seek(0, os.SEEK_END), b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            lines = (fh.read(step) + tail).split(b"\n")
            tail = lines[0]  # may be the end of a line that starts in an earlier block
            yield from (line for line in reversed(lines[1:]) if line)
        if tail:
            yield tail


def matches(record: dict[str, Any], *, ref: str | None, event: str | None,
            since: float | None) -> bool:
    if ref is not None and record.get("secret_ref") != ref:
        return False
    if event is not None and record.get("event") != event and not (
        event.endswith(".") and str(record.get("event", "")).startswith(event)
    ):
        return False
    if since is not None:
        try:
            when = datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            return False
        return when >= since
    return True


# --- the writer ---------------------------------------------------------------------------


def _last_line(fd: int, size: int) -> bytes | None:
    """The last complete line of the file, read backwards from its end."""
    block = 65536
    pos, tail = size, b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        body = tail.rstrip(b"\n")
        cut = body.rfind(b"\n")
        if cut >= 0 or pos == 0:
            return body[cut + 1 :] if body else None
    return None


class AuditLog:
    """Appends under an exclusive flock, so the CLI and the daemon never fork the chain.

    `fsync="always"` syncs and checkpoints each event; `"batch"` leaves both to `flush()`,
    which the daemon calls at most 100 ms later. The write itself is always synchronous, so
    a full or read-only file system refuses the action instead of losing its record.
    """

    def __init__(self, path: Path, key: bytes,
                 checkpoint: Callable[[int, str, Callable[[int, str], str]], None],
                 fsync: str = "always") -> None:
        self._path = path
        self._key = key
        self._checkpoint = checkpoint  # (seq, mac, sealer): metadata.advance_checkpoint
        self._seal_checkpoint = functools.partial(seal_checkpoint, key)
        self._always = fsync == "always"
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._end = -1
        self._seq = 0
        self._prev = GENESIS
        self._unsynced: tuple[int, str] | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def has_room(self) -> bool:
        """Whether the log's file system is writable and not (nearly) full. Checked before a
        request that writes nothing first (it reuses an audited lease) is acted on, so a
        full or read-only disk refuses it instead of losing its record afterwards."""
        try:
            with self._lock:
                fd = self._open()
            st = os.fstatvfs(fd)
        except OSError:
            return False
        return not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize >= MIN_FREE_BYTES

    def append(self, event: str, actor: str, **fields: Any) -> dict[str, Any]:
        """Write one event; raise AuditUnavailable if it cannot be written."""
        return self.append_many([(event, fields)], actor)[-1]

    def append_many(self, events: list[tuple[str, dict[str, Any]]], actor: str
                    ) -> list[dict[str, Any]]:
        """Write events in order under one lock and in one write (the daemon's batch of
        after-the-fact records); all of them or, on failure, none (AuditUnavailable)."""
        try:
            with self._lock:
                return self._append(events, actor)
        except OSError as exc:
            raise AuditUnavailable(
                f"cannot write the audit log {self._path}: {exc.strerror}; the action was refused"
            ) from None

    def _append(self, events: list[tuple[str, dict[str, Any]]], actor: str
                ) -> list[dict[str, Any]]:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size != self._end:  # another process appended since our last write
                self._resync(fd, size)
            ts = rfc3339()
            seq, prev, lines, written_events = self._seq, self._prev, [], []
            for event, fields in events:
                seq += 1
                line = seal(self._key, seq=seq, prev=prev, ts=ts, event=event, actor=actor,
                            fields=fields)
                prev = line_hash(line)
                lines.append(line)
                written_events.append({"seq": seq, "ts": ts, "event": event})
            data = b"\n".join(lines) + b"\n"
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "short write (file system full?)")
                if self._always:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # never leave half a line behind
                raise
            self._end, self._seq, self._prev = size + len(data), seq, prev
            mac = lines[-1][-66:-2].decode()
            if self._always:
                self._checkpoint(self._seq, mac, self._seal_checkpoint)
            else:
                self._unsynced = (self._seq, mac)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return written_events

    def _resync(self, fd: int, size: int) -> None:
        last = _last_line(fd, size)
        if last is None:
            self._seq, self._prev = 0, GENESIS
        else:
            try:
                self._seq = int(json.loads(last)["seq"])
            except (ValueError, KeyError, TypeError):
                raise OSError(5, "the last audit line is damaged; run `secret-broker audit "
                                 "verify`") from None
            self._prev = line_hash(last)
        self._end = size

    @property
    def pending(self) -> bool:
        """Batch mode: lines appended but not yet fsynced (a hint, read without the lock)."""
        return self._unsynced is not None

    def flush(self) -> None:
        """Batch mode: make everything appended so far durable and checkpoint it."""
        with self._lock:
            pending, self._unsynced = self._unsynced, None
            fd = self._fd
        if pending is None or fd is None:
            return
        os.fsync(fd)
        self._checkpoint(*pending, self._seal_checkpoint)

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
