"""Usage accounting and budgets, as plain objects (no sockets, no database).

`UsageTap` reads a copy of a response as it streams to the caller (SSE events, or one
JSON body; gzip decoded on its own copy) and picks the provider's own usage fields.
`UsageBook` adds requests up per (consumer, provider, model, route, day) in memory until
the daemon flushes them. `Budgets` reserves an estimate before a request is forwarded and
settles it with the real count afterwards, so concurrent requests overshoot a daily limit
by at most one request.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from broker.gateway import sse

TAP_LIMIT = 8 << 20  # bytes of a non-SSE body kept for parsing; past that usage is unknown
DEFAULT_OUTPUT_ESTIMATE = 1024  # reserved when a request names no max_tokens
MAX_COUNT = 10**9  # a token count past this (or below 0) is a mistake or an attack: unknown
# A request body up to this size is parsed for its model and token limit; a larger one only
# has the ends scanned, where the SDKs put those keys: json.loads of tens of megabytes would
# stall every other request on the event loop (and can take a gigabyte).
PARSE_LIMIT = 1 << 20
_SCAN_SPAN = 64 << 10  # bytes at each end of a large request body scanned for its keys
_REQUEST_KEYS = ("model", "max_tokens", "max_completion_tokens", "max_output_tokens",
                 "maxOutputTokens")
_REQUEST_KEY = {name: re.compile(rb'"' + name.encode()
                                 + rb'"\s*:\s*("(?:[^"\\]|\\.){0,200}"|\d{1,10})')
                for name in _REQUEST_KEYS}
DIMENSIONS = ("consumer", "provider", "model", "route", "day")
_USAGE_TRIES = 8  # usage keys tried, from the end of a JSON body, before giving up
# Where a JSON body keeps its usage object: Gemini's name, then everyone else's.
_USAGE_KEY = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*')
              for name in ("usageMetadata", "usage")}
_USAGE_SPAN = 64 << 10  # bytes after the key a usage object may take



@dataclass
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    @property
    def known(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    @property
    def total(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or 0)


def _int(value: Any) -> int | None:
    """A token count: a whole number from 0 to MAX_COUNT; anything else is unknown (None)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


def _dig(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def apply(fmt: str, doc: Any, usage: Usage) -> None:
    """Update `usage` from one JSON document (a body or an SSE event) in format `fmt`."""
    if not isinstance(doc, dict):
        return
    if fmt == "gemini":
        meta = doc.get("usageMetadata")
        if isinstance(meta, dict):  # each chunk repeats the running totals: keep the last
            usage.input_tokens = _int(meta.get("promptTokenCount"))
            usage.output_tokens = _int(meta.get("candidatesTokenCount")) or 0
            usage.cached_tokens = _int(meta.get("cachedContentTokenCount"))
            usage.reasoning_tokens = _int(meta.get("thoughtsTokenCount"))
    elif fmt == "anthropic":
        u = _dig(doc, "message", "usage") if doc.get("type") == "message_start" \
            else doc.get("usage")
        if isinstance(u, dict):
            usage.input_tokens = _int(u.get("input_tokens")) or usage.input_tokens
            usage.output_tokens = _int(u.get("output_tokens"))
            usage.cached_tokens = _int(u.get("cache_read_input_tokens")) or usage.cached_tokens
    elif fmt == "openai-responses":
        u = doc.get("usage") if "usage" in doc else _dig(doc, "response", "usage")
        if isinstance(u, dict):
            usage.input_tokens = _int(u.get("input_tokens"))
            usage.output_tokens = _int(u.get("output_tokens"))
            usage.cached_tokens = _int(_dig(u, "input_tokens_details", "cached_tokens"))
            usage.reasoning_tokens = _int(_dig(u, "output_tokens_details", "reasoning_tokens"))
    elif fmt in ("openai", "total_tokens"):
        u = doc.get("usage")
        if not isinstance(u, dict):
            return
        if fmt == "total_tokens":
            usage.input_tokens, usage.output_tokens = _int(u.get("total_tokens")), 0
            return
        usage.input_tokens = _int(u.get("prompt_tokens"))
        usage.output_tokens = _int(u.get("completion_tokens")) or 0
        usage.cached_tokens = _int(_dig(u, "prompt_tokens_details", "cached_tokens"))
        usage.reasoning_tokens = _int(_dig(u, "completion_tokens_details", "reasoning_tokens"))


_DECODER = json.JSONDecoder()


class UsageTap:
    """Fed each chunk as it is forwarded; never holds more than one SSE line or TAP_LIMIT."""

    def __init__(self, fmt: str, content_type: str, content_encoding: str | None) -> None:
        self._fmt = fmt
        self._sse = content_type.startswith("text/event-stream")
        self._usable = content_encoding in (None, "", "identity", "gzip", "deflate")
        self._inflate = (zlib.decompressobj(zlib.MAX_WBITS | 32)
                         if content_encoding in ("gzip", "deflate") else None)
        self._buffer = bytearray()
        self.usage = Usage()

    def feed(self, chunk: bytes) -> None:
        if not self._usable:
            return
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                self._usable = False
                return
        self._buffer += chunk
        if self._sse:
            self._events()
        elif len(self._buffer) > TAP_LIMIT:
            self._usable = False
            self._buffer.clear()

    def _events(self) -> None:
        if b"usage" not in self._buffer:  # most chunks: no event here can carry usage
            cut = self._buffer.rfind(b"\n")  # keep only the line still arriving
            if cut >= 0:
                del self._buffer[: cut + 1]
            elif len(self._buffer) > TAP_LIMIT:
                self._buffer.clear()
            return
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > TAP_LIMIT:
                    self._buffer.clear()
                return
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            data = sse.data_of(line)
            if data is not None and b"usage" in data:  # most events carry none
                self._parse(data)

    def _parse(self, data: bytes) -> None:
        if b"usage" not in data:  # every format's usage fields are named usage…
            return
        try:
            doc = json.loads(data)
        except ValueError:
            return
        for item in doc if isinstance(doc, list) else [doc]:  # Gemini streams arrays too
            apply(self._fmt, item, self.usage)

    def _tail_usage(self, body: bytearray) -> None:
        """Apply the last usage object of a JSON body, found from its end.

        Providers put usage last, and json.loads of a multi-megabyte embeddings answer
        would stall every other stream on the event loop; only the object itself is parsed.
        Inside a JSON string every `"` is escaped, so the pattern only matches a real key.
        """
        name = "usageMetadata" if self._fmt == "gemini" else "usage"
        pattern, needle = _USAGE_KEY[name], f'"{name}"'.encode()
        end = len(body)
        for _ in range(_USAGE_TRIES):
            start = end = body.rfind(needle, 0, end)
            if start < 0:
                return
            key = pattern.match(body, start)
            if key is None:
                continue
            tail = body[key.end():key.end() + _USAGE_SPAN].decode("utf-8", "replace")
            try:
                value, _ = _DECODER.raw_decode(tail)
            except ValueError:
                continue
            if isinstance(value, dict):
                apply(self._fmt, {name: value}, self.usage)
                return

    def finish(self) -> Usage:
        if self._usable and not self._sse:
            self._tail_usage(self._buffer)
        elif self._usable:
            self._events()
            line = bytes(self._buffer).strip()
            data = sse.data_of(line)
            self._parse(line if data is None else data)
        self._buffer.clear()
        return self.usage


def request_model(params: dict[str, str], body: Any) -> str | None:
    """The model a request names: Gemini and Azure in the path, others in the JSON body."""
    model = params.get("model") or params.get("deployment")
    if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
        model = body["model"]
    return model[:200] if model else None


def request_doc(raw_body: bytes) -> Any:
    """The JSON request body as far as usage needs it (None if it is not JSON): parsed
    whole up to PARSE_LIMIT; past it, the first of each key found in the first or last
    _SCAN_SPAN bytes, in a dict shaped like the body (a best effort, for budgets and labels)."""
    if len(raw_body) <= PARSE_LIMIT:
        try:
            return json.loads(raw_body)
        except (ValueError, RecursionError):
            return None
    ends = (raw_body[:_SCAN_SPAN], raw_body[-_SCAN_SPAN:])
    found: dict[str, Any] = {}
    for name, pattern in _REQUEST_KEY.items():
        match = next((m for end in ends for m in pattern.finditer(end)), None)
        if match is not None:
            try:
                found[name] = json.loads(match.group(1))
            except ValueError:  # a string with a bad escape: unknown
                continue
    if "maxOutputTokens" in found:
        found["generationConfig"] = {"maxOutputTokens": found.pop("maxOutputTokens")}
    return found


def estimate_tokens(raw_body: bytes, body: Any) -> int:
    """Input (about 4 bytes a token) plus the output the request allows itself."""
    limit = None
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            limit = limit or _int(body.get(key))
        limit = limit or _int(_dig(body, "generationConfig", "maxOutputTokens"))
    return len(raw_body) // 4 + (limit or DEFAULT_OUTPUT_ESTIMATE)


# --- adding up ------------------------------------------------------------------------------


@dataclass
class UsageRow:
    consumer: str | None
    provider: str | None
    model: str | None
    route: str | None
    day: str | None
    requests: int = 0
    errors: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def add(self, usage: Usage, *, requests: int = 1, errors: int = 0) -> None:
        self.requests += requests
        self.errors += errors
        for name in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
            value = getattr(usage, name)
            if value is not None:
                setattr(self, name, (getattr(self, name) or 0) + value)

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class UsageBook:
    """Rows added up in memory between flushes (the request path never touches the DB)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str | None, str, str], UsageRow] = {}

    def record(self, consumer: str, provider: str, model: str | None, route: str, day: str,
               usage: Usage, error: bool) -> None:
        key = (consumer, provider, model, route, day)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = UsageRow(*key)
        row.add(usage, errors=int(error))

    def drain(self) -> list[UsageRow]:
        rows, self._rows = list(self._rows.values()), {}
        return rows


def group(rows: Iterable[UsageRow], by: Iterable[str]) -> list[UsageRow]:
    """Add rows up over the dimensions not in `by` (those become None)."""
    keep = tuple(by)
    out: dict[tuple[Any, ...], UsageRow] = {}
    for row in rows:
        c, p, m, r, d = (getattr(row, d) if d in keep else None for d in DIMENSIONS)
        total = out.get((c, p, m, r, d))
        if total is None:
            total = out[(c, p, m, r, d)] = UsageRow(c, p, m, r, d)
        total.add(Usage(row.input_tokens, row.output_tokens, row.cached_tokens,
                        row.reasoning_tokens), requests=row.requests, errors=row.errors)
    return sorted(out.values(), key=lambda r: tuple(str(getattr(r, d)) for d in DIMENSIONS))


@dataclass(frozen=True)
class Reservation:
    token_id: str
    day: str
    estimate: int


class Budgets:
    """Daily token budgets per consumer token: reserve, then settle. Event-loop only, so a
    check and its reservation are one step and concurrent requests cannot race past."""

    def __init__(self) -> None:
        self.used: dict[tuple[str, str], int] = {}  # (token_id, day) -> settled tokens
        self.unflushed: dict[tuple[str, str], int] = {}  # settled since the last flush
        self._reserved: dict[tuple[str, str], int] = {}

    def reserve(self, token_id: str, day: str, limit: int, estimate: int) -> Reservation | None:
        estimate = max(0, estimate)  # a negative hold would free budget it never had
        key = (token_id, day)
        if self.used.get(key, 0) + self._reserved.get(key, 0) + estimate > limit:
            return None
        self._reserved[key] = self._reserved.get(key, 0) + estimate
        return Reservation(token_id, day, estimate)

    def settle(self, reservation: Reservation, actual: int) -> None:
        actual = max(0, actual)  # nothing a request did gives back what was spent
        key = (reservation.token_id, reservation.day)
        self._reserved[key] -= reservation.estimate
        self.used[key] = self.used.get(key, 0) + actual
        self.unflushed[key] = self.unflushed.get(key, 0) + actual

    def drain(self) -> dict[tuple[str, str], int]:
        spent, self.unflushed = self.unflushed, {}
        return spent
