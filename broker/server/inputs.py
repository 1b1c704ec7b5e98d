"""What handlers read from a request: its body within a limit, a JSON object, the consumer."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from broker.core.errors import BodyTooLarge, Forbidden, UsageError
from broker.core.refs import CONSUMER_RE
from broker.server.auth import Principal
from broker.server.state import CONFIG
from broker.service.secrets import MAX_VALUE_BYTES

JSON_LIMIT = 64 << 10  # a JSON route's body: requests, grants questions, token settings
# A body that carries a secret's value: the largest value the store takes (MAX_VALUE_BYTES),
# written as JSON with every byte escaped (`\u00XX`, six bytes each), and its metadata.
VALUE_JSON_LIMIT = 6 * MAX_VALUE_BYTES + JSON_LIMIT


def consumer_of(request: web.Request) -> str:
    principal: Principal = request["principal"]
    if len(request.headers.getall("X-Broker-Consumer", [])) > 1:  # which one would win?
        raise UsageError("send X-Broker-Consumer once")
    claimed = request.headers.get("X-Broker-Consumer")
    if claimed is not None and not CONSUMER_RE.fullmatch(claimed):
        raise UsageError("X-Broker-Consumer must be 1-128 of A-Z a-z 0-9 _ . -")
    if principal.consumer is not None:
        if claimed is not None and claimed != principal.consumer:
            raise Forbidden(f"this token belongs to consumer {principal.consumer!r}",
                            code="consumer_mismatch")
        return principal.consumer
    return claimed or request.app[CONFIG].config.default_consumer


async def read_body(request: web.Request, limit: int, setting: str) -> bytes:
    """The body, or 413 past `limit` bytes: at once when Content-Length says so, else as
    soon as a chunked body passes it (what comes after is never kept)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, setting)
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise _too_large(limit, setting)
    return bytes(body)


def _too_large(limit: int, setting: str) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is larger than {limit} bytes ({setting})")


async def json_body(request: web.Request, limit: int = JSON_LIMIT) -> dict[str, Any]:
    raw = await read_body(request, limit, "the most this route accepts")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: 400, not a 500
        raise UsageError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    return body
