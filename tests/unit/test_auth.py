"""Pure parts of authentication: token extraction and the failure throttle."""

from __future__ import annotations

from broker.auth import FailureThrottle, presented_token


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
