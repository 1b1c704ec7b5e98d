"""Tokens: the owner's bootstrap token (`sbt_`, a file) and consumer tokens (`sbc_`, hashed
in metadata): made, listed, revoked and rotated here, each act audited."""

from __future__ import annotations

import base64
import secrets
import time

from broker.core.clock import parse_duration, rfc3339
from broker.core.digest import token_hash
from broker.core.errors import NotFound, UsageError
from broker.core.home import write_private
from broker.core.refs import CONSUMER_RE
from broker.service.context import Context
from broker.store.metadata import TokenMeta

TOKEN_PREFIX = "sbt_"  # noqa: S105 - a prefix, not a token
CONSUMER_TOKEN_PREFIX = "sbc_"  # noqa: S105 - a prefix, not a token


def new_token(prefix: str = TOKEN_PREFIX) -> str:
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


class Tokens:
    """The tokens of one home, changed as the context's actor."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def rotate_bootstrap(self) -> None:
        """A new bootstrap token in the home's token file; the old one stops working."""
        with self.ctx.writing():
            self.ctx.record("token.rotated")
            write_private(self.ctx.home.token, (new_token() + "\n").encode())
            self.ctx.metadata.bump_generation()  # a running daemon re-reads the token file

    def create(self, consumer: str, ttl: str | None = None, description: str | None = None,
               daily_tokens: int | None = None) -> tuple[TokenMeta, str]:
        """A new `sbc_` token for `consumer`; the value is returned once and never stored."""
        if not CONSUMER_RE.fullmatch(consumer):
            raise UsageError(f"invalid consumer {consumer!r}: use 1-128 of A-Z a-z 0-9 _ . -")
        expires_at = None
        if ttl is not None:
            seconds = parse_duration(ttl)
            if not seconds:
                raise UsageError(f"--ttl {ttl!r}: use a positive duration like 90s, 30m, 12h, 7d")
            expires_at = rfc3339(time.time() + seconds)
        if description is not None and (len(description) > 500 or "\n" in description):
            raise UsageError("the description must be one line of at most 500 characters")
        if daily_tokens is not None and (isinstance(daily_tokens, bool) or daily_tokens < 1):
            raise UsageError("--daily-tokens must be a positive whole number")
        token = new_token(CONSUMER_TOKEN_PREFIX)
        meta = TokenMeta("tok_" + secrets.token_hex(8), token_hash(token), consumer,
                         description, rfc3339(), expires_at, None, None, daily_tokens)
        self.ctx.record("token.created", token_id=meta.id, consumer=consumer)
        self.ctx.metadata.insert_token(meta)
        return meta, token

    def all(self) -> list[TokenMeta]:
        return self.ctx.metadata.tokens()

    def revoke(self, *, token_id: str | None = None,
               consumer: str | None = None) -> list[TokenMeta]:
        known = self.ctx.metadata.tokens()
        if token_id is not None and token_id not in {t.id for t in known}:
            raise NotFound(f"no token {token_id}; see `secret-broker token list`",
                           code="token_not_found")
        if consumer is not None and consumer not in {t.consumer for t in known}:
            raise NotFound(f"no token for consumer {consumer!r}", code="token_not_found")
        revoked = self.ctx.metadata.revoke_tokens(rfc3339(), token_id=token_id,
                                                  consumer=consumer)
        for token in revoked:
            self.ctx.record("token.revoked", token_id=token.id, consumer=token.consumer)
        return revoked
