"""broker.cli.mcp's pure parts: the scrubber every tool answer passes, and answer parsing."""

from __future__ import annotations

import base64
import json

from broker.cli.mcp import error_parts, read_answer
from broker.gateway.scrub import REDACTED, scrub, secret_forms

TOKEN = "sbc_" + "Zm9vYmFy-_" * 4

KEYS = {
    "openai": "sk-proj-" + "A1b2C3d4" * 6,
    "anthropic": "sk-ant-api03-" + "x_Y-z" * 10,
    "google": "AIza" + "S" * 35,
    "voyage": "pa-" + "q7W" * 12,
    "jina": "jina_" + "0a9b8c7d" * 8,
}


def test_token_is_removed_exactly_and_in_every_base64_form() -> None:
    """The consumer token, and its standard and URL-safe base64 (padded or not), go."""
    raw = TOKEN.encode()
    forms = [TOKEN, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
             base64.b64encode(raw).decode().rstrip("=")]
    text = " | ".join(forms)
    out = scrub(text, [TOKEN])
    assert all(form not in out for form in forms)
    assert out == " | ".join([REDACTED] * 4)


def test_secret_forms_are_longest_first() -> None:
    """A padded form is replaced before its unpadded prefix, so no `=` is left behind."""
    forms = secret_forms("ab")  # base64 "YWI=" and "YWI"
    assert forms.index("YWI=") < forms.index("YWI")
    assert scrub("YWI=", ["ab"]) == REDACTED


def test_every_provider_key_shape_is_removed() -> None:
    """OpenAI, Anthropic, Google, Voyage and Jina key shapes are redacted without knowing them."""
    for provider, key in KEYS.items():
        out = scrub(f"Bearer {key}, then more", [])
        assert out == f"Bearer {REDACTED}, then more", provider


def test_ordinary_text_is_left_alone() -> None:
    """Words that merely contain a key prefix, short ids and non-strings pass untouched."""
    doc = {"task": "task-abcdefghijklmnopqrstu", "id": "sk-short", "spa": "spa-0123456789abcdefgh",
           "n": 3, "ok": True, "none": None, "f": 0.25}
    assert scrub(doc, [TOKEN]) == doc


def test_nested_keys_and_values_are_scrubbed() -> None:
    """Dict keys, list items and deep values are all scrubbed; the structure is kept."""
    doc = {TOKEN: [{"a": f"x {KEYS['openai']} y"}, (KEYS["google"],)], "b": {"c": [TOKEN]}}
    out = scrub(doc, [TOKEN])
    assert out == {REDACTED: [{"a": f"x {REDACTED} y"}, [REDACTED]], "b": {"c": [REDACTED]}}
    blob = json.dumps(out)
    assert TOKEN not in blob and KEYS["openai"] not in blob and KEYS["google"] not in blob


def test_sse_answers_become_their_events() -> None:
    """Each event's data is decoded; comments and `[DONE]` are dropped; JSON stays JSON."""
    raw = (b': keep-alive\n\ndata: {"a": 1}\n\nevent: delta\ndata: {"b": 2}\n\n'
           b"data: plain\n\ndata: [DONE]\n\n")
    assert read_answer("text/event-stream; charset=utf-8", raw) == (
        True, [{"a": 1}, {"b": 2}, "plain"])
    assert read_answer("application/json", b'{"x": [1]}') == (False, {"x": [1]})
    assert read_answer("application/json", b'{"cut') == (False, '{"cut')


def test_error_parts_read_every_error_shape() -> None:
    """The broker's and the providers' error JSON give their code and message."""
    assert error_parts({"error": {"message": "m", "type": "broker_error",
                                  "code": "grant_denied"}}) == ("grant_denied", "m")
    assert error_parts({"error": {"code": 403, "message": "g", "status": "PERMISSION_DENIED",
                                  "reason": "grant_denied"}}) == ("grant_denied", "g")
    assert error_parts({"detail": "d", "code": "grant_denied"}) == ("grant_denied", "d")
    assert error_parts({"error": {"code": 500, "message": "boom"}}) == (None, "boom")
    assert error_parts("Bad Gateway") == (None, "Bad Gateway")
