"""Pure parts of authentication: token extraction and the failure throttle."""

from __future__ import annotations

import hashlib
from pathlib import Path

from multidict import CIMultiDict

from broker.gateway.providers import BUILTIN
from broker.server.auth import Authenticator, ConsumerToken, FailureThrottle, presented_token
from broker.server.gateway import upstream_headers


def test_presented_token_looks_only_where_told() -> None:
    """Bearer in Authorization, or a raw x-goog-api-key where the provider allows it."""
    headers = {"authorization": "Bearer abc", "x-goog-api-key": "goog"}
    assert presented_token(headers, ("authorization",)) == "abc"
    google = ("authorization", "x-goog-api-key")
    assert presented_token({"x-goog-api-key": "goog"}, google) == "goog"
    assert presented_token({"authorization": "Basic abc"}, ("authorization",)) is None
    assert presented_token({"x-goog-api-key": "goog"}, ("authorization",)) is None


def test_throttle_doubles_after_free_failures_and_resets_after_window() -> None:
    """Five free failures, then 10 ms doubling to the cap; a quiet window forgives."""
    now = [0.0]
    throttle = FailureThrottle(free=5, window=60, cap=2.0, clock=lambda: now[0])
    delays = [throttle.penalty("p") for _ in range(14)]
    assert delays[:5] == [0.0] * 5
    assert delays[5:9] == [0.01, 0.02, 0.04, 0.08]
    assert max(delays) == 2.0
    assert throttle.penalty("other") == 0.0
    now[0] = 61.0
    assert throttle.penalty("p") == 0.0


def test_broker_tokens_withheld_from_any_upstream_header(tmp_path: Path) -> None:
    """Whichever token a caller presents, it and the owner's token are cut from every header."""
    token_file = tmp_path / "broker.token"
    token_file.write_text("sbt_owner\n")
    auth = Authenticator(token_file)
    auth.consumer_tokens = {hashlib.sha256(b"sbc_agent").hexdigest():
                            ConsumerToken("tok_1", "agent", None, False)}
    assert auth.authenticate("sbc_agent", "tcp").consumer == "agent"
    withheld = auth.broker_tokens("sbc_agent")
    assert withheld == ("sbt_owner", "sbc_agent")
    assert auth.authenticate(None, "unix").kind == "owner"  # the socket presents none
    assert auth.broker_tokens(None) == ("sbt_owner",)
    incoming = CIMultiDict([("X-Trace", "a sbc_agent b"), ("X-Copy", "sbt_owner"),
                            ("Accept", "application/json"), ("Authorization", "Bearer sbc_agent")])
    out = upstream_headers(incoming, BUILTIN["openai"], "sk-real", withheld)
    assert list(out.items()) == [("Accept", "application/json"),
                                 ("Authorization", "Bearer sk-real")]
