"""Scrubbing stored values and key shapes from answers (pure).

The gateway scrubs a /proxy answer of every stored value when the MCP server asks for it
(`SCRUB_HEADER`); the MCP server scrubs what it hands the model of key shapes and its own
token. Both use these functions, so the two layers agree on what a value looks like.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"
# What provider keys look like (OpenAI and Anthropic `sk-…`, Google `AIza…`, Voyage `pa-…`,
# Jina `jina_…`), where no letter or digit runs into them. The MCP server cannot know the
# stored values, so it removes anything shaped like one: defence in depth behind the gateway.
KEY_SHAPES = re.compile(r"(?<![A-Za-z0-9])(?:sk-[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{35}"
                        r"|pa-[A-Za-z0-9_-]{16,}|jina_[A-Za-z0-9_-]{16,})")


def secret_forms(secret: str) -> list[str]:
    """A secret as written and in base64 (standard and URL-safe, padded or not), longest
    first so that no form is cut by a shorter one."""
    forms = {secret}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(secret.encode()).decode()
        forms |= {encoded, encoded.rstrip("=")}
    return sorted(forms, key=len, reverse=True)


def scrub(doc: Any, secrets: Iterable[str]) -> Any:
    """`doc` (JSON-like) with each secret (exact and base64) and anything shaped like a
    provider key replaced by [redacted], in keys and values at any depth."""
    forms = [form for secret in secrets if secret for form in secret_forms(secret)]

    def text(value: str) -> str:
        for form in forms:
            value = value.replace(form, REDACTED)
        return KEY_SHAPES.sub(REDACTED, value)

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return text(node)
        if isinstance(node, dict):
            return {text(str(k)): walk(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v) for v in node]
        return node

    return walk(doc)


def scrub_bytes(raw: bytes, secrets: Iterable[str], cut: bool = False) -> bytes:
    """`raw` with each secret (exact and base64) replaced by [redacted]; for an answer `cut`
    short, also a trailing start of one, which the rest would have completed."""
    forms = [form.encode() for secret in secrets if secret for form in secret_forms(secret)]
    for form in forms:
        raw = raw.replace(form, REDACTED.encode())
    if cut:
        for form in forms:
            raw = next((raw[:-k] for k in range(len(form) - 1, 0, -1)
                        if raw.endswith(form[:k])), raw)
    return raw
