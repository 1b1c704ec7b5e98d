"""Server-sent events (`text/event-stream`): the one reader of their `data:` fields. Pure.

The usage tap reads a stream line by line as it passes; the MCP server reads a whole
answer into its events. Both go through `data_of`.
"""

from __future__ import annotations

import json
import re
from typing import Any


def data_of(line: bytes) -> bytes | None:
    """The value of one `data:` line, its one leading space dropped; None for another line."""
    if not line.startswith(b"data:"):
        return None
    return line[5:].removeprefix(b" ")


def events(raw: bytes) -> list[Any]:
    """The `data` of each event (JSON-decoded where it is JSON); comments and OpenAI's
    closing `[DONE]` are left out."""
    found: list[Any] = []
    for block in re.split(rb"\r?\n\r?\n", raw):
        data = b"\n".join(d for line in block.splitlines() if (d := data_of(line)) is not None)
        if not data or data == b"[DONE]":
            continue
        text = data.decode("utf-8", "replace")
        try:
            found.append(json.loads(text))
        except ValueError:
            found.append(text)
    return found
