"""Property-based fuzzing of the parsers an attacker (or a damaged file) can reach: the route
normaliser, the grants loader and the vault envelope decoder. Each may refuse with its own
error type, never crash with another; and what they accept stays inside their rules.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from broker.core.errors import MethodNotAllowed, RouteNotFound
from broker.gateway import routes
from broker.gateway.providers import build_providers
from broker.store import envelope
from grants import Grant, GrantsError, load_grants, parse_grants

# Derandomized so CI is repeatable; each was also run with 4000 random examples.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# --- routes -------------------------------------------------------------------------------------

PROVIDERS = build_providers({"openai": {"base_url": "http://127.0.0.1:9000/openai"},
                             "azure-openai": {"base_url": "https://res.openai.azure.com"}})
PIECES = ["/", "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%25", "%",
          "%00", "%65", "%7e", "%41", "\\", ";", ":", "@", "+", "?", "&", "=", "#", "~", "-",
          "_", "v1", "v1beta", "chat", "completions", "embeddings", "rerank", "responses",
          "models", "gemini-2.0-flash", ":generateContent", ":streamGenerateContent", "openai",
          "google", "jina", "voyage", "azure-openai", "openai/deployments/d1/chat/completions",
          "key=x", "a", "Z", "9", "é", " ", "\x00", "\n"]
raw_paths = st.lists(st.sampled_from(PIECES), max_size=20).map(lambda p: "/proxy/" + "".join(p))
methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS", "post"])


def _route_regex(path: str) -> re.Pattern[str]:
    """The route table's own pattern for a path, rebuilt independently of routes.py."""
    parts = re.split(r"\{\w+\}", path)
    return re.compile("[A-Za-z0-9._~-]+".join(re.escape(p) for p in parts))


@FUZZ
@given(st.one_of(raw_paths, st.text(max_size=200).map(lambda t: "/proxy/" + t)), methods)
@example("/proxy/google/v1beta/models/..:generateContent", "POST")  # `..` as a model name
@example("/proxy/google/v1/models/a..b:streamGenerateContent", "POST")
def test_a_matched_path_is_always_one_of_the_route_tables_patterns(raw: str, method: str) -> None:
    """Any matched path fits a table route; its upstream URL keeps the provider host and prefix."""
    try:
        m = routes.match(PROVIDERS, method, raw)
    except (RouteNotFound, MethodNotAllowed):
        return
    assert m.route in m.provider.routes and m.route.method == method
    assert _route_regex(m.route.path).fullmatch(m.path), (raw, m.path)
    for bad in ("..", "//", "%", "\\", "?", "#"):
        assert bad not in m.path, (raw, m.path)
    assert m.provider.base_url is not None
    base = URL(m.provider.base_url)
    upstream = URL(m.upstream_url(""), encoded=True)
    assert (upstream.scheme, upstream.host, upstream.port) == (base.scheme, base.host, base.port)
    assert upstream.raw_path == base.raw_path.rstrip("/") + "/" + m.path


@FUZZ
@given(st.text(max_size=300))
@example("v1/..x/embeddings")
def test_normalise_refuses_or_returns_clean_segments(raw: str) -> None:
    """`normalise` returns only segments with no separator, escape or dot segment."""
    try:
        segments = routes.normalise(raw)
    except RouteNotFound:
        return
    for segment in segments:
        assert segment and segment != "." and ".." not in segment
        assert not set(segment) & set("/\\%?#\x00 ")


# --- grants -------------------------------------------------------------------------------------

KEYS = ["secret_ref", "consumer", "purposes", "delivery", "allowed_hosts", "ttl_secs",
        "grants", "purpose", "Secret_Ref", '"consumer"', "'ttl_secs'", "a.b", "x"]
VALUES = ['"openai_api_key"', '"@x"', '"default"', '""', '" a "', "300", "0", "86401", "-1",
          "1e3", "true", "1979-05-27T07:32:00Z", '["llm.chat"]', "[]", '["native", "env"]',
          '["api.openai.com", "127.0.0.1:8080", "[::1]:1"]', '["*.x", "http://a/b"]',
          "[[1], [2]]", "{a = 1}", '"""multi\n[[grants]]\nline"""', "'lit'",
          "[" * 50 + "]" * 50, "99999999999999999999999999", "nan", "inf"]
LINES = st.one_of(
    st.sampled_from(["[[grants]]", "[grants]", "[[grants.x]]", "[other]", "[[ grants ]]",
                     "# [[grants]]", "", "grants = []", "grants = [{}]"]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.text(max_size=40),
)


@FUZZ
@given(st.lists(LINES, max_size=30).map("\n".join))
def test_grants_parser_raises_only_grants_error(text: str) -> None:
    """TOML-ish input built from grants keys and hostile values: GrantsError or grants."""
    try:
        grants = parse_grants(text)
    except GrantsError as exc:
        assert exc.problems and str(exc)
        return
    assert all(isinstance(g, Grant) for g in grants)


@FUZZ
@given(st.binary(max_size=500))
def test_grants_loader_raises_only_grants_error_on_any_bytes(data: bytes) -> None:
    """Any bytes in the grants file: GrantsError or grants (never another exception)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "secrets.grants.toml"
        path.write_bytes(data)
        try:
            grants = load_grants(path)
        except GrantsError as exc:
            assert exc.problems
            return
    assert all(isinstance(g, Grant) for g in grants)


names = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
hosts = st.sampled_from(["api.openai.com", "127.0.0.1:9000", "[::1]:8443", "a.b.example"])
grant_tables = st.builds(
    lambda ref, consumer, purposes, delivery, hosts_, ttl: (
        f'[[grants]]\nsecret_ref = "{ref}"\nconsumer = "{consumer}"\n'
        f"purposes = {json.dumps(purposes)}\ndelivery = {json.dumps(delivery)}\n"
        f"allowed_hosts = {json.dumps(hosts_)}\nttl_secs = {ttl}\n\n"),
    names, names, st.lists(st.sampled_from(["llm.chat", "llm.embeddings", "llm.rerank"]),
                           min_size=1, max_size=3, unique=True),
    st.lists(st.sampled_from(["native", "http_header_inject", "env"]), min_size=1, max_size=3,
             unique=True),
    st.lists(hosts, min_size=1, max_size=3, unique=True), st.integers(1, 86400))


@settings(FUZZ, max_examples=80)
@given(st.lists(grant_tables, min_size=1, max_size=4).map("".join), st.data())
def test_a_half_written_grants_file_never_widens_access(text: str, data: st.DataObject) -> None:
    """Any prefix of a valid grants file is invalid or grants at most what the whole file grants."""
    full = parse_grants(text)
    cuts = data.draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=20))
    for cut in cuts:
        try:
            partial = parse_grants(text[:cut])
        except GrantsError:
            continue
        assert len(partial) <= len(full)
        for got, whole in zip(partial, full, strict=False):
            assert (got.secret_ref, got.consumer) == (whole.secret_ref, whole.consumer)
            assert set(got.purposes) <= set(whole.purposes)
            assert set(got.delivery) <= set(whole.delivery)
            assert set(got.allowed_hosts) <= set(whole.allowed_hosts)
            assert got.ttl_secs <= whole.ttl_secs


# --- the vault envelope -------------------------------------------------------------------------

KEY = bytes(range(32))
SEALED = envelope.seal_secret(KEY, "openai_api_key", 3, b"sk-fuzz-value")
HEADER = json.loads(envelope.dump_header(envelope.make_header(
    KEY, "passphrase", envelope.KdfParams(65536, 3, 4, b"s" * 16))))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_header_decoder_raises_only_envelope_error(data: bytes) -> None:
    """Arbitrary bytes or JSON as `vault/header.json`: EnvelopeError, never another error."""
    try:
        header = envelope.load_header(data)
    except envelope.EnvelopeError as exc:
        assert str(exc)
        return
    assert header.unlock in ("passphrase", "keyfile")  # a real header, fully validated


@FUZZ
@given(st.sampled_from(["unlock", "kdf", "check", "format", "version", "alg", "m", "t", "p",
                        "salt"]), json_values)
def test_a_tampered_header_field_is_refused_or_still_in_bounds(field: str, value: Any) -> None:
    """A tampered header field is refused, or the KDF stays within its floor and ceiling."""
    doc = json.loads(json.dumps(HEADER))
    (doc["kdf"] if field in ("alg", "m", "t", "p", "salt") else doc)[field] = value
    try:
        header = envelope.load_header(json.dumps(doc).encode())
    except envelope.EnvelopeError:
        return
    if header.kdf is not None:
        for name in ("m", "t", "p"):
            value_ = getattr(header.kdf, name)
            assert envelope.KDF_FLOOR[name] <= value_ <= envelope.KDF_CEILING[name]


@FUZZ
@given(st.binary(max_size=200))
def test_secret_decoder_raises_only_envelope_error(blob: bytes) -> None:
    """Arbitrary bytes as a secret file: EnvelopeError, never another error or a value."""
    try:
        envelope.open_secret(KEY, "openai_api_key", blob)
    except envelope.EnvelopeError:
        return
    raise AssertionError("random bytes decrypted")


@FUZZ
@given(st.integers(0, len(SEALED) * 8 - 1), st.integers(-len(SEALED), 40))
def test_any_bit_flip_or_length_change_of_a_secret_file_is_refused(bit: int, extend: int) -> None:
    """Flip any one bit, or cut or pad the file: it never decrypts (to anything)."""
    flipped = bytearray(SEALED)
    flipped[bit // 8] ^= 1 << (bit % 8)
    resized = SEALED[:extend] if extend < 0 else SEALED + os.urandom(extend)
    for blob in ({bytes(flipped), resized} - {SEALED}):
        try:
            envelope.open_secret(KEY, "openai_api_key", blob)
        except envelope.EnvelopeError:
            continue
        raise AssertionError(f"a damaged file decrypted (bit {bit}, extend {extend})")
    assert envelope.open_secret(KEY, "openai_api_key", SEALED) == (3, b"sk-fuzz-value")
