"""Time as the broker writes and reads it: RFC 3339 stamps, UTC days, durations (`7d`)."""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int | None:
    """`90s`, `30m`, `12h`, `7d` -> seconds; None when `text` is not a duration."""
    m = _DURATION.fullmatch(text.strip())
    return None if m is None else int(m.group(1)) * _UNITS[m.group(2)]


def rfc3339(t: float | None = None) -> str:
    """RFC 3339, UTC, milliseconds; the per-second prefix is cached (one call per event)."""
    t = time.time() if t is None else t
    second = int(t // 1)
    return f"{_second_prefix(second)}{int((t - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second_prefix(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def parse_rfc3339(text: str | None) -> float | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def utc_day(t: float | None = None) -> str:
    """The day a usage row or budget belongs to: YYYY-MM-DD in UTC (budgets reset at 00:00)."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))
