"""`secrets.grants.toml` -> validated Grants.

Nothing is ignored or guessed: a typo must not silently widen or narrow access, so every
problem is collected and reported at once, each with the line and key that caused it.
tomllib gives no positions, so lines are recovered by scanning the text.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from grants import tomlfile
from grants.model import DELIVERIES, REF_PATTERN, Grant, GrantsError, Problem

REQUIRED_KEYS = ("secret_ref", "consumer", "purposes", "delivery", "allowed_hosts", "ttl_secs")
MAX_TTL_SECS = 86400

_REF = re.compile(rf"@?{REF_PATTERN}")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_DIGITS = re.compile(r"[0-9]+")
_PORT = re.compile(r"[1-9][0-9]{0,4}")  # no leading zeros: "host:080" would never match
# The first key of a line or header: bare, "basic" or 'literal' (escapes are left as written).
_NAME = r"""(?:(?P<bare>[A-Za-z0-9_-]+)|"(?P<basic>(?:[^"\\\n]|\\.)*)"|'(?P<literal>[^'\n]*)')"""
_HEADER = re.compile(rf"\s*(?P<open>\[\[?)\s*{_NAME}\s*(?P<close>\]\]?\s*$|\.)")
_ASSIGN = re.compile(rf"\s*{_NAME}\s*[=.]")
# Multi-line strings can hold anything, including "[[grants]]" lines; comments can too.
_STRING_OR_COMMENT = re.compile(
    r'"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\'|#[^\n]*', re.S
)
_TOML_TYPES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    dict: "a table",
    datetime.datetime: "a date-time",
    datetime.date: "a date",
    datetime.time: "a time",
}


_T = TypeVar("_T")


class _Invalid(Exception):
    """A value check failed; the message says what is wrong with the value, never quoting
    it: a key pasted into the wrong field must not reach the daemon log or the audit log."""


def parse_grants(text: str, source: str = "secrets.grants.toml") -> tuple[Grant, ...]:
    """Parse and validate grants; raise GrantsError listing every problem."""
    try:
        doc = tomlfile.parse(text)
    except tomlfile.TomlFileError as e:
        raise GrantsError(source, [Problem(e.line, None, None, e.reason)]) from None

    layout = _layout(text)
    problems: list[Problem] = []
    for key in doc:
        if key != "grants":
            message = "unknown top-level key" + (
                _did_you_mean(key, ["grants"]) or "; only [[grants]] tables belong in this file"
            )
            problems.append(Problem(layout.top_level_line(key), None, key, message))

    tables = doc.get("grants", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        message = "must be an array of tables, written as [[grants]] headers"
        problems.append(Problem(layout.top_level_line("grants"), None, "grants", message))
    elif len(layout.grant_headers) != len(tables):
        # Inline tables would leave grants without a header line to report or explain.
        message = "write each grant as its own [[grants]] table, not as an inline table"
        problems.append(Problem(layout.top_level_line("grants"), None, "grants", message))
    else:
        grants = [
            _grant(table, index, header, layout, problems)
            for index, (table, header) in enumerate(zip(tables, layout.grant_headers, strict=True))
        ]
        if not problems:
            return tuple(g for g in grants if g is not None)
    raise GrantsError(source, sorted(problems, key=lambda p: p.line or 0))


def load_grants(path: Path) -> tuple[Grant, ...]:
    """Load the grants file; a missing file is no grants, so everything is denied."""
    try:
        text = tomlfile.read_text(path)
    except tomlfile.TomlFileError as e:
        raise GrantsError(str(path), [Problem(e.line, None, None, e.reason)]) from None
    return () if text is None else parse_grants(text, str(path))


def _grant(
    table: dict[str, object], index: int, header: int, layout: _Layout, problems: list[Problem]
) -> Grant | None:
    """Validate one grant table, appending its problems; None when any field is unusable."""

    def report(key: str, message: str) -> None:
        line = layout.keys.get((header, key), header)
        problems.append(Problem(line, index, key, message))

    def field(key: str, check: Callable[[object], _T]) -> _T | None:
        if key not in table:
            problems.append(Problem(header, index, key, "missing required key"))
            return None
        try:
            return check(table[key])
        except _Invalid as e:
            report(key, str(e))
            return None

    for key in table:
        if key not in REQUIRED_KEYS:
            hint = _did_you_mean(key, REQUIRED_KEYS) or f" (expected {', '.join(REQUIRED_KEYS)})"
            report(key, "unknown key" + hint)
    secret_ref = field("secret_ref", _secret_ref)
    consumer = field("consumer", _text)
    purposes = field("purposes", _list_of(_text))
    delivery = field("delivery", _list_of(_delivery))
    allowed_hosts = field("allowed_hosts", _list_of(_host))
    ttl_secs = field("ttl_secs", _ttl)
    if (
        secret_ref is None
        or consumer is None
        or purposes is None
        or delivery is None
        or allowed_hosts is None
        or ttl_secs is None
    ):
        return None
    return Grant(index, header, secret_ref, consumer, purposes, delivery, allowed_hosts, ttl_secs)


def _text(value: object) -> str:
    """A non-empty string without stray whitespace, which would never match anything."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_toml_type(value)}")
    if not value:
        raise _Invalid("must not be empty")
    if value != value.strip():
        raise _Invalid("must not start or end with whitespace")
    return value


def _secret_ref(value: object) -> str:
    ref = _text(value)
    if not _REF.fullmatch(ref):
        raise _Invalid("is not a secret ref (1 to 128 of A-Z a-z 0-9 _ . -, '@' optional)")
    return ref.removeprefix("@")


def _ttl(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer number of seconds, not {_toml_type(value)}")
    if not 1 <= value <= MAX_TTL_SECS:
        raise _Invalid(f"is outside 1..{MAX_TTL_SECS}")
    return value


def _delivery(value: str) -> str:
    if value not in DELIVERIES:
        hint = _did_you_mean(value, DELIVERIES) or f" (expected {', '.join(sorted(DELIVERIES))})"
        raise _Invalid(f"unknown delivery{hint}")
    return value


def _host(value: str) -> str:
    """A host name, IPv4 or [IPv6] literal, with an optional :port; lower-cased."""
    if not value.isascii():
        raise _Invalid("is not ASCII; write international names as xn-- punycode")
    host = value.lower()
    if any(c.isspace() for c in host):
        raise _Invalid("contains whitespace")
    if "://" in host:
        raise _Invalid("has a scheme; write only the host, e.g. 'api.openai.com'")
    if "/" in host:
        raise _Invalid("has a path; write only the host and optional :port")
    if "*" in host:
        raise _Invalid("is a wildcard; list each host exactly")
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _Invalid("is not a host or host:port")
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise _Invalid("is not a bracketed IPv6 address") from None
    else:
        if host.count(":") > 1:
            raise _Invalid("write an IPv6 address in brackets, e.g. '[::1]:8080'")
        name, colon, port_text = host.partition(":")
        port = port_text if colon else None
        labels = name.split(".")
        if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
            raise _Invalid("is not a host name or host:port")
        if _DIGITS.fullmatch(labels[-1]):  # numeric names are IPv4 literals or nothing
            try:
                ipaddress.IPv4Address(name)
            except ValueError:
                raise _Invalid("is not a valid IPv4 address") from None
    if port is not None and not (_PORT.fullmatch(port) and int(port) <= 65535):
        raise _Invalid("has a bad port; use 1..65535")
    return host


def _list_of(item: Callable[[str], str]) -> Callable[[object], tuple[str, ...]]:
    """A check for a non-empty array whose entries all pass `item`; reports each bad one."""

    def check(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"must be an array of strings, not {_toml_type(value)}")
        if not value:
            raise _Invalid("must not be empty")
        errors, items = [], []
        for position, entry in enumerate(value, 1):
            try:
                if not isinstance(entry, str):
                    raise _Invalid(f"must be a string, not {_toml_type(entry)}")
                items.append(item(entry))
            except _Invalid as e:
                errors.append(f"entry {position}: {e}")
        if errors:
            raise _Invalid("; ".join(errors))
        return tuple(items)

    return check


def _toml_type(value: object) -> str:
    return _TOML_TYPES.get(type(value), type(value).__name__)


def _did_you_mean(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _code_lines(text: str) -> list[str]:
    """The text's lines with comments and multi-line strings blanked, keeping line numbers.

    Split on "\\n" only: that is TOML's line break and the one tomllib counts.
    """

    def blank(m: re.Match[str]) -> str:
        token = m.group()
        if token.startswith("#"):
            return ""
        return "\n" * token.count("\n") if token[:3] in ('"""', "'''") else token

    return _STRING_OR_COMMENT.sub(blank, text).split("\n")


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where headers and keys are in the text, found in one pass over its lines."""

    grant_headers: list[int]  # line of each exact [[grants]] header
    tables: dict[str, int]  # top-level name -> line of its first [table] or [[table]] header
    keys: dict[tuple[int, str], int]  # (line of the enclosing header, 0 = root; key) -> line

    def top_level_line(self, key: str) -> int | None:
        """Where a top-level key is set: `key = ...` before any header, or `[key]`/`[[key]]`."""
        return self.keys.get((0, key)) or self.tables.get(key)


def _layout(text: str) -> _Layout:
    """Scan once, so locating many problems stays linear in the file's size."""
    grant_headers: list[int] = []
    tables: dict[str, int] = {}
    keys: dict[tuple[int, str], int] = {}
    section = 0
    for n, line in enumerate(_code_lines(text), 1):
        if header := _HEADER.match(line):
            name = _first_name(header)
            tables.setdefault(name, n)
            if header["open"] == "[[" and name == "grants" and header["close"].startswith("]]"):
                grant_headers.append(n)
            section = n
        elif assign := _ASSIGN.match(line):
            keys.setdefault((section, _first_name(assign)), n)
    return _Layout(grant_headers, tables, keys)


def _first_name(match: re.Match[str]) -> str:
    """The first key of a (possibly dotted) name, whichever way it was quoted."""
    return next(name for name in match.group("bare", "basic", "literal") if name is not None)
