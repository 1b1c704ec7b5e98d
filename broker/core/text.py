"""Text from requests, files and the audit log, made safe to print on a terminal."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, bidi marks and overrides, line and paragraph separators: a
# terminal acts on them (erase a line, fake a row, write the clipboard, reorder text).
_OTHERS = "\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
_UNPRINTABLE = re.compile(f"[\x00-\x1f{_OTHERS}]")
_UNPRINTABLE_IN_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")  # keeps \t and \n


def _escaped(match: re.Match[str]) -> str:
    return ascii(match.group())[1:-1]  # \x1b, \x9b, \u202e: visible, and unambiguous


def printable(text: str, *, lines: bool = False) -> str:
    """Every control character as a visible escape like `\\x1b`; `lines` keeps newlines and
    tabs (a whole message), else they are escaped too (one table cell or log value)."""
    return (_UNPRINTABLE_IN_LINES if lines else _UNPRINTABLE).sub(_escaped, text)
