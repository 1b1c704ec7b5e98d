"""Pure parts of the flood defences: the throttle far past its ceiling, the refusal tally,
and reading the audit log from its end."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.server.auth import FailureThrottle, RefusalTally
from broker.store import audit


def test_throttle_stays_at_its_cap_for_100000_failures() -> None:
    """100,000 failures in one window: each delay is a number within the cap (no overflow
    past ~1,000), rising to the cap and staying there; the window still forgives."""
    now = [0.0]
    throttle = FailureThrottle(free=5, window=60, cap=2.0, clock=lambda: now[0])
    delays = [throttle.penalty("p") for _ in range(100_000)]
    assert delays[:5] == [0.0] * 5
    assert delays == sorted(delays)
    assert delays[20:] == [2.0] * (100_000 - 20)
    now[0] = 61.0
    assert throttle.penalty("p") == 0.0


def tally_at(now: list[float], **kw: int) -> RefusalTally:
    return RefusalTally(window=60.0, clock=lambda: now[0], **kw)


def fields(reason: str = "invalid", peer: str = "127.0.0.2") -> dict[str, object]:
    return {"reason": reason, "peer": peer, "status": 401, "route": "/v1/x", "token_id": None}


def test_tally_writes_the_first_and_counts_the_rest_of_a_window() -> None:
    """The first refusal of a key is written at once; the rest become one line with `count`
    when the window closes, and the next refusal opens a new window."""
    now = [0.0]
    tally = tally_at(now)
    assert tally.first("auth.failed", "loopback", fields(), 0.0)
    assert not any(tally.first("auth.failed", "loopback", fields(peer=f"127.0.0.{i}"), 0.5)
                   for i in range(3, 100))
    assert tally.first("auth.failed", "loopback", fields("missing"), 0.0)  # another reason
    now[0] = 59.0
    assert tally.closed() == []
    now[0] = 60.0
    assert tally.closed() == [("auth.failed", {"reason": "invalid", "peer": "127.0.0.2",
                                               "status": 401, "token_id": None,
                                               "count": 97}, 0.5)]
    assert tally.first("auth.failed", "loopback", fields(), 0.0)


def test_tally_keys_are_bounded_and_shutdown_writes_every_count() -> None:
    """Past max_keys, new peers share one key; `everything` closes every open window."""
    now = [0.0]
    tally = tally_at(now, max_keys=2)
    for peer in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1"):
        tally.first("auth.failed", peer, fields(peer=peer), 0.0)
    closed = tally.closed(everything=True)
    assert [(f["peer"], f["count"]) for _e, f, _d in closed] == [("10.0.0.1", 1), ("other", 1)]
    assert tally.closed(everything=True) == []


@pytest.mark.parametrize("block", [1, 7, 64, 65536])
def test_lines_backwards_match_lines_forwards(tmp_path: Path, block: int) -> None:
    """Whatever the block size, reading from the end gives the same lines, reversed."""
    path = tmp_path / "audit.log"
    lines = [f'{{"seq":{i},"pad":"{"x" * (i % 13)}"}}'.encode() for i in range(1, 200)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert list(audit.read_lines_backwards(path, block)) == lines[::-1]
    assert list(audit.read_lines_backwards(tmp_path / "missing.log", block)) == []
