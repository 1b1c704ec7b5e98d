"""What a token is stored and looked up by: its SHA-256, never the token itself."""

from __future__ import annotations

import hashlib


def token_hash(token: str | bytes) -> str:
    """Hex SHA-256 of a token (a str as UTF-8; bytes as given, for header bytes that are not
    UTF-8, which must compare unequal rather than crash)."""
    return hashlib.sha256(token if isinstance(token, bytes) else token.encode()).hexdigest()
