"""One authentication step: whatever a request presents becomes a Principal, or 401.

The bootstrap token is re-read when `broker.token` changes, so `token rotate` ends the
old token at once. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.errors import Unauthorized


@dataclass(frozen=True)
class Principal:
    kind: str  # "owner": the bootstrap token or the Unix socket
    via: str  # "unix" | "tcp"
    consumer: str | None = None  # fixed by a consumer token; None = the caller may name one
    token_id: str | None = None


def presented_token(headers: Mapping[str, str], places: Iterable[str]) -> str | None:
    """The broker token a caller sent, looked for in the headers its SDK uses."""
    for name in places:
        value = headers.get(name)
        if not value:
            continue
        if name.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            continue
        return value.strip()
    return None


class Authenticator:
    def __init__(self, token_path: Path) -> None:
        self._path = token_path
        self._signature: tuple[int, int] | None = None
        self._token = b""

    def _bootstrap(self) -> bytes:
        try:
            st = self._path.stat()
            signature = (st.st_ino, st.st_mtime_ns)
            if signature != self._signature:
                self._token = self._path.read_bytes().strip()
                self._signature = signature
        except FileNotFoundError:
            self._token, self._signature = b"", None
        return self._token

    def authenticate(self, presented: str | None, via: str) -> Principal:
        if presented is None:
            if via == "unix":  # protected by the socket's 0600 mode in a 0700 directory
                return Principal("owner", via)
            raise Unauthorized("missing broker token: send Authorization: Bearer <token>",
                               code="unauthorized")
        expected = self._bootstrap()
        if expected and hmac.compare_digest(presented.encode(), expected):
            return Principal("owner", via)
        raise Unauthorized("invalid broker token", code="unauthorized")
