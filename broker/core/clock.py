"""Durations written by people (`90s`, `7d`)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int | None:
    """`90s`, `30m`, `12h`, `7d` -> seconds; None when `text` is not a duration."""
    m = _DURATION.fullmatch(text.strip())
    return None if m is None else int(m.group(1)) * _UNITS[m.group(2)]
