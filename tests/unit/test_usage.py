"""The usage tap, the book and budgets: pure logic, fed bytes as the gateway feeds them."""

from __future__ import annotations

import gzip
import json

from hypothesis import given
from hypothesis import strategies as st

from broker.gateway.usage import (
    Budgets,
    Usage,
    UsageBook,
    UsageTap,
    apply,
    estimate_tokens,
    group,
    request_model,
)

OPENAI_CHUNKS = [
    {"choices": [{"delta": {"content": "hi"}}], "usage": None},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                              "prompt_tokens_details": {"cached_tokens": 2},
                              "completion_tokens_details": {"reasoning_tokens": 1}}},
]


def sse(events: list[object]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) \
        + b"data: [DONE]\n\n"


def tap_all(fmt: str, data: bytes, content_type: str = "text/event-stream",
            encoding: str | None = None, pieces: int = 1) -> Usage:
    tap = UsageTap(fmt, content_type, encoding)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        tap.feed(data[i:i + step])
    return tap.finish()


@given(st.integers(min_value=1, max_value=200))
def test_sse_usage_found_however_the_stream_is_cut(pieces: int) -> None:
    """Chunk boundaries anywhere (mid-line, mid-JSON) never change the counts."""
    usage = tap_all("openai", sse(OPENAI_CHUNKS), pieces=pieces)
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens,
            usage.reasoning_tokens) == (7, 5, 2, 1)


def test_stream_without_usage_is_unknown() -> None:
    """OpenAI chat without include_usage: nothing known."""
    assert not tap_all("openai", sse(OPENAI_CHUNKS[:1])).known


def test_gzip_body_is_decoded_on_the_taps_own_copy() -> None:
    """A gzip JSON answer still yields its usage."""
    body = gzip.compress(json.dumps({"usage": {"total_tokens": 9}}).encode())
    usage = tap_all("total_tokens", body, "application/json", "gzip", pieces=3)
    assert (usage.input_tokens, usage.output_tokens) == (9, 0)


@given(st.text(max_size=40), st.integers(min_value=1, max_value=50))
def test_json_body_usage_is_the_real_key_whatever_the_strings_hold(text: str, pieces: int) -> None:
    """Strings that spell out a usage key (escaped quotes) never shadow the real one."""
    decoy = json.dumps({"usage": {"prompt_tokens": 999}}) + text
    body = json.dumps({"data": [{"text": decoy, "usage_note": text}], "model": "m",
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                       "system_fingerprint": text}).encode()
    usage = tap_all("openai", body, "application/json", pieces=pieces)
    assert (usage.input_tokens, usage.output_tokens) == (3, 4)


def test_large_embeddings_body_usage_found_from_the_end() -> None:
    """A multi-megabyte answer yields its usage (first or last key), and Gemini's name."""
    vectors = [{"embedding": [0.125] * 1024, "index": i} for i in range(300)]
    last = json.dumps({"data": vectors, "usage": {"total_tokens": 11}}).encode()
    first = json.dumps({"usage": {"total_tokens": 12}, "data": vectors}).encode()
    assert len(last) > 1 << 20
    assert tap_all("total_tokens", last, "application/json", pieces=40).input_tokens == 11
    assert tap_all("total_tokens", first, "application/json", pieces=40).input_tokens == 12
    gemini = json.dumps({"embeddings": vectors, "usageMetadata": {
        "promptTokenCount": 5, "candidatesTokenCount": 6}}).encode()
    usage = tap_all("gemini", gemini, "application/json", pieces=7)
    assert (usage.input_tokens, usage.output_tokens) == (5, 6)


def test_json_body_with_null_or_broken_usage_is_unknown() -> None:
    """usage: null, or a truncated body, leaves usage unknown."""
    assert not tap_all("openai", b'{"usage": null}', "application/json").known
    assert not tap_all("openai", b'{"x": 1, "usage": {"prompt_tok', "application/json").known


def test_unknown_encoding_gives_unknown_usage() -> None:
    """Brotli (or anything the tap cannot decode) leaves usage unknown, never crashes."""
    assert not tap_all("openai", b"\x8b\x00garbage", "application/json", "br").known


def test_anthropic_start_then_delta() -> None:
    """message_start gives input (and a placeholder output); message_delta the real output."""
    usage = Usage()
    apply("anthropic", {"type": "message_start", "message": {"usage": {
        "input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": 2}}}, usage)
    apply("anthropic", {"type": "message_delta", "usage": {"output_tokens": 5}}, usage)
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (7, 5, 2)


def test_gemini_and_responses_formats() -> None:
    """Gemini keeps the last usageMetadata; Responses reads response.completed."""
    g = Usage()
    apply("gemini", {"usageMetadata": {"promptTokenCount": 7}}, g)
    apply("gemini", {"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 5,
                                       "thoughtsTokenCount": 1}}, g)
    assert (g.input_tokens, g.output_tokens, g.reasoning_tokens) == (7, 5, 1)
    r = Usage()
    apply("openai-responses", {"type": "response.completed", "response": {"usage": {
        "input_tokens": 3, "output_tokens": 4}}}, r)
    assert r.total == 7


def test_model_and_estimate() -> None:
    """The path's model wins; the estimate is body size plus the request's own limit."""
    assert request_model({"model": "gemini-x"}, {"model": "other"}) == "gemini-x"
    assert request_model({}, {"model": "gpt"}) == "gpt"
    assert request_model({}, None) is None
    assert estimate_tokens(b"x" * 400, {"max_tokens": 50}) == 150
    assert estimate_tokens(b"", {"generationConfig": {"maxOutputTokens": 9}}) == 9
    assert estimate_tokens(b"", None) == 1024


def test_budget_reserves_then_settles() -> None:
    """Reservations count against the limit until settled with the real figure."""
    budgets = Budgets()
    first = budgets.reserve("tok", "d", 100, 60)
    assert first is not None
    assert budgets.reserve("tok", "d", 100, 60) is None  # 60 reserved + 60 > 100
    budgets.settle(first, 12)
    assert budgets.reserve("tok", "d", 100, 60) is not None  # 12 used + 60 <= 100
    assert budgets.drain() == {("tok", "d"): 12}


def test_book_and_grouping() -> None:
    """Rows add up per key; grouping sums and keeps unknown tokens as None."""
    book = UsageBook()
    book.record("a", "openai", "m", "r", "d", Usage(7, 5), error=False)
    book.record("a", "openai", "m", "r", "d", Usage(), error=True)
    book.record("b", "google", "g", "r", "d", Usage(), error=False)
    rows = book.drain()
    assert [(r.requests, r.errors, r.input_tokens) for r in rows] == [(2, 1, 7), (1, 0, None)]
    by_consumer = group(rows, ["consumer"])
    assert [(r.consumer, r.provider, r.requests) for r in by_consumer] == \
        [("a", None, 2), ("b", None, 1)]
    assert book.drain() == []
