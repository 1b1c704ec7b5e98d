"""Secret refs, consumer names and provider names: the one place their rules are written.

The ref characters come from `grants.model.REF_PATTERN`, since grants (the lowest layer,
which imports nothing of broker) checks refs and consumers in secrets.grants.toml too.
"""

from __future__ import annotations

import re

from broker.core.errors import UsageError
from grants.model import REF_PATTERN

REF_RE = re.compile(REF_PATTERN)
AT_REF_RE = re.compile(rf"@?{REF_PATTERN}")  # as written in files: "@" optional
CONSUMER_RE = REF_RE  # a consumer name uses the same characters as a ref
PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
TEAM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # teams, their members and groups


def parse_ref(text: str) -> str:
    """`@openai_api_key` or `openai_api_key` -> `openai_api_key`, or a UsageError."""
    ref = text[1:] if text.startswith("@") else text
    if not REF_RE.fullmatch(ref) or ref in (".", ".."):
        raise UsageError(
            f"invalid secret ref {text!r}: use 1-128 of A-Z a-z 0-9 _ . - (e.g. @openai_api_key)"
        )
    return ref
