"""broker.store.envelope: the vault format as pure functions, held to strict bounds."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.store import envelope
from broker.store.envelope import EnvelopeError, KdfParams

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "envelope"
HEAD = len(envelope.MAGIC) + 8 + envelope.NONCE_BYTES


def keyfile_header(key: bytes = KEY) -> bytes:
    return envelope.dump_header(envelope.make_header(key, "keyfile", None))


def passphrase_doc(m: int = 65536, t: int = 3, p: int = 4, salt: bytes = b"s" * 16,
                   key: bytes = KEY) -> dict[str, Any]:
    """A header document as written (check sealed under `key`), to edit field by field."""
    header = envelope.make_header(key, "passphrase", KdfParams(m, t, p, salt))
    doc: dict[str, Any] = json.loads(envelope.dump_header(header))
    return doc


def dumps(doc: object) -> bytes:
    return json.dumps(doc).encode()


# --- secret files ---------------------------------------------------------------------------


def test_secret_round_trip() -> None:
    """A sealed value opens under the same key and ref, returning its version."""
    blob = envelope.seal_secret(KEY, "openai_api_key", 7, "sk-é\n".encode())
    assert blob.startswith(envelope.MAGIC)
    assert envelope.open_secret(KEY, "openai_api_key", blob) == (7, "sk-é\n".encode())


def test_seal_uses_a_fresh_nonce() -> None:
    """Two seals of the same value differ (random nonce), and both open."""
    a = envelope.seal_secret(KEY, "r", 1, b"value")
    b = envelope.seal_secret(KEY, "r", 1, b"value")
    assert a != b
    assert envelope.open_secret(KEY, "r", a) == envelope.open_secret(KEY, "r", b)


def test_wrong_key_fails() -> None:
    """A value sealed under one key does not open under another."""
    blob = envelope.seal_secret(KEY, "r", 1, b"value")
    with pytest.raises(EnvelopeError, match="failed authentication"):
        envelope.open_secret(OTHER_KEY, "r", blob)


def test_ciphertext_bound_to_its_ref() -> None:
    """The ref is associated data: a blob copied to another ref fails, naming that ref."""
    blob = envelope.seal_secret(KEY, "openai_api_key", 1, b"value")
    with pytest.raises(EnvelopeError, match=r"@jina_api_key .*copied from another secret"):
        envelope.open_secret(KEY, "jina_api_key", blob)


def test_ciphertext_bound_to_its_version() -> None:
    """Editing the version field in the clear part breaks authentication."""
    blob = envelope.seal_secret(KEY, "r", 3, b"value")
    rolled = blob[:4] + struct.pack(">Q", 2) + blob[12:]
    with pytest.raises(EnvelopeError, match="failed authentication"):
        envelope.open_secret(KEY, "r", rolled)


@pytest.mark.parametrize("cut", [0, 3, 4, 12, HEAD, HEAD + 15])
def test_truncated_blob(cut: int) -> None:
    """A blob shorter than magic + version + nonce + tag is refused as truncated."""
    blob = envelope.seal_secret(KEY, "r", 1, b"value")
    with pytest.raises(EnvelopeError, match="truncated or not a vault file"):
        envelope.open_secret(KEY, "r", blob[:cut])


def test_truncated_ciphertext_fails_authentication() -> None:
    """Cutting bytes off the ciphertext (but keeping a tag's worth) fails authentication."""
    blob = envelope.seal_secret(KEY, "r", 1, b"a longer value to cut")
    with pytest.raises(EnvelopeError, match="failed authentication"):
        envelope.open_secret(KEY, "r", blob[:-5])


def test_wrong_magic() -> None:
    """A file that does not start with the magic is not a vault file."""
    blob = envelope.seal_secret(KEY, "r", 1, b"value")
    with pytest.raises(EnvelopeError, match="not a vault file"):
        envelope.open_secret(KEY, "r", b"SBV2" + blob[4:])


@settings(deadline=None)  # no timing flakes on a loaded machine
@given(index=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_detected(index: int, bit: int) -> None:
    """Flipping any single bit of a sealed blob makes it fail to open."""
    blob = bytearray(envelope.seal_secret(KEY, "r", 1, b"value"))
    blob[index % len(blob)] ^= 1 << bit
    with pytest.raises(EnvelopeError):
        envelope.open_secret(KEY, "r", bytes(blob))


@settings(deadline=None)  # no timing flakes on a loaded machine
@given(st.binary(max_size=200), st.text(max_size=20))
def test_random_blobs_raise_only_envelope_error(blob: bytes, ref: str) -> None:
    """Arbitrary bytes given to open_secret raise EnvelopeError, never anything else."""
    with pytest.raises(EnvelopeError):
        envelope.open_secret(KEY, ref, blob)


@settings(deadline=None)  # no timing flakes on a loaded machine
@given(st.binary(max_size=200))
def test_random_blobs_after_magic_raise_only_envelope_error(tail: bytes) -> None:
    """Bytes behind a valid magic (so parsing goes further) still raise only EnvelopeError."""
    with pytest.raises(EnvelopeError):
        envelope.open_secret(KEY, "r", envelope.MAGIC + tail)


# --- the header -------------------------------------------------------------------------------


def test_keyfile_header_round_trip() -> None:
    """A key-file header dumps, loads back equal, and passes the key check with its key."""
    header = envelope.make_header(KEY, "keyfile", None)
    loaded = envelope.load_header(envelope.dump_header(header))
    assert loaded == header
    envelope.check_key(loaded, KEY)


def test_key_check_refuses_another_key() -> None:
    """A wrong key fails the key check before any secret is touched."""
    header = envelope.load_header(keyfile_header())
    with pytest.raises(EnvelopeError, match="key check failed"):
        envelope.check_key(header, OTHER_KEY)


def test_passphrase_header_round_trip() -> None:
    """A passphrase header keeps its KDF parameters and salt, and checks its key."""
    kdf = KdfParams(65536, 3, 4, b"0123456789abcdef")
    header = envelope.make_header(KEY, "passphrase", kdf)
    loaded = envelope.load_header(envelope.dump_header(header))
    assert loaded.kdf == kdf
    envelope.check_key(loaded, KEY)


def test_new_kdf_params_meet_rfc9106_second_option() -> None:
    """New vaults use m = 64 MiB, t = 3, p = 4 and a 16-byte random salt."""
    a, b = envelope.new_kdf_params(), envelope.new_kdf_params()
    assert (a.m, a.t, a.p, len(a.salt)) == (65536, 3, 4, 16)
    assert a.salt != b.salt


def test_derive_key_is_deterministic_and_salted() -> None:
    """Same passphrase and parameters give the same 32-byte key; another salt another key."""
    kdf = KdfParams(65536, 3, 1, b"a" * 16)
    key = envelope.derive_key(b"correct horse", kdf)
    assert len(key) == 32
    assert envelope.derive_key(b"correct horse", kdf) == key
    assert envelope.derive_key(b"correct horse", KdfParams(65536, 3, 1, b"b" * 16)) != key


@pytest.mark.parametrize(("field", "value", "message"), [
    ("m", 65535, "m=65535 is outside 65536..1048576"),
    ("m", 1024, "m=1024 is outside"),
    ("m", 1048577, "m=1048577 is outside"),
    ("m", 2**62, "outside"),
    ("t", 2, "t=2 is outside 3..16"),
    ("t", 17, "t=17 is outside"),
    ("p", 0, "p=0 is outside 1..16"),
    ("p", 17, "p=17 is outside"),
    ("m", -1, "outside"),
])
def test_kdf_bounds_enforced_on_load(field: str, value: int, message: str) -> None:
    """Parameters below the floor or above the ceiling are refused before any derivation."""
    doc = passphrase_doc()
    doc["kdf"][field] = value
    with pytest.raises(EnvelopeError, match=message):
        envelope.load_header(dumps(doc))


@pytest.mark.parametrize("field", ["m", "t", "p"])
def test_derive_key_refuses_out_of_bounds(field: str) -> None:
    """derive_key holds parameters to the same bounds, whoever calls it."""
    values = {"m": 65536, "t": 3, "p": 1}
    values[field] = 0
    with pytest.raises(EnvelopeError, match=f"{field}=0 is outside"):
        envelope.derive_key(b"pw", KdfParams(salt=b"s" * 16, **values))


@pytest.mark.parametrize("salt", [b"", b"s" * 15, b"s" * 65])
def test_salt_length_bounds(salt: bytes) -> None:
    """A salt shorter than 16 or longer than 64 bytes is refused."""
    doc = passphrase_doc()
    doc["kdf"]["salt"] = base64.b64encode(salt).decode()
    with pytest.raises(EnvelopeError, match="salt length"):
        envelope.load_header(dumps(doc))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["kdf"].update(m=True), "m must be an integer"),
    (lambda d: d["kdf"].update(t=3.0), "t must be an integer"),
    (lambda d: d["kdf"].update(p="4"), "p must be an integer"),
    (lambda d: d["kdf"].pop("m"), "m must be an integer"),
    (lambda d: d["kdf"].update(alg="argon2i"), "argon2id"),
    (lambda d: d.update(kdf=None), "argon2id"),
    (lambda d: d["kdf"].update(salt="not base64!"), "salt is not valid base64"),
    (lambda d: d["kdf"].update(salt=12), "salt must be base64 text"),
    (lambda d: d.update(check=base64.b64encode(b"x" * 10).decode()), "wrong length"),
    (lambda d: d.pop("check"), "check must be base64"),
    (lambda d: d.update(unlock="none"), "unlock must be"),
    (lambda d: d.update(format="other"), "not a secret-broker vault"),
    (lambda d: d.update(version=2), "not a secret-broker vault"),
])
def test_malformed_header_fields(edit: Any, message: str) -> None:
    """Each malformed field is refused with a message that says which."""
    doc = passphrase_doc()
    edit(doc)
    with pytest.raises(EnvelopeError, match=message):
        envelope.load_header(dumps(doc))


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"null", b"[" * 100_000])
def test_unparseable_headers(data: bytes) -> None:
    """Non-JSON, non-object and absurdly nested headers raise EnvelopeError only."""
    with pytest.raises(EnvelopeError):
        envelope.load_header(data)


@pytest.mark.parametrize(("field", "value"), [
    ("m", 131072), ("t", 4), ("p", 2), ("salt", base64.b64encode(b"t" * 16).decode()),
])
def test_edited_params_within_bounds_fail_key_check(field: str, value: object) -> None:
    """The header's parameters are the key check's associated data: any edit fails it."""
    doc = passphrase_doc()
    doc["kdf"][field] = value
    header = envelope.load_header(dumps(doc))
    with pytest.raises(EnvelopeError, match="key check failed"):
        envelope.check_key(header, KEY)


def test_unlock_mode_is_bound_to_key_check() -> None:
    """Switching a passphrase header to keyfile (dropping the KDF) fails the key check."""
    doc = passphrase_doc()
    doc["unlock"] = "keyfile"
    del doc["kdf"]
    with pytest.raises(EnvelopeError, match="key check failed"):
        envelope.check_key(envelope.load_header(dumps(doc)), KEY)


@settings(deadline=None)  # no timing flakes on a loaded machine
@given(st.binary(max_size=300))
def test_random_bytes_to_load_header_raise_only_envelope_error(data: bytes) -> None:
    """Arbitrary bytes as a header raise EnvelopeError, never anything else."""
    with pytest.raises(EnvelopeError):
        envelope.load_header(data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    unlock=st.sampled_from(["passphrase", "keyfile"]) | _JSON,
    kdf=st.fixed_dictionaries({}, optional={
        "alg": st.just("argon2id") | _JSON,
        "m": st.integers() | _JSON, "t": st.integers() | _JSON, "p": st.integers() | _JSON,
        "salt": st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()) | _JSON,
    }) | _JSON,
    check=st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()) | _JSON,
)
def test_structured_headers_load_or_raise_envelope_error(unlock: Any, kdf: Any,
                                                          check: Any) -> None:
    """Near-valid documents either load within bounds or raise EnvelopeError, nothing else."""
    doc = {"format": envelope.FORMAT, "version": 1, "unlock": unlock, "kdf": kdf,
           "check": check}
    try:
        header = envelope.load_header(dumps(doc))
    except EnvelopeError:
        return
    assert header.unlock in ("passphrase", "keyfile")
    if header.kdf is not None:
        for name in ("m", "t", "p"):
            value = getattr(header.kdf, name)
            assert envelope.KDF_FLOOR[name] <= value <= envelope.KDF_CEILING[name]
    with pytest.raises(EnvelopeError):
        envelope.check_key(header, KEY)  # a random check never passes


# --- vectors ------------------------------------------------------------------------------------


def _vectors() -> list[Path]:
    return sorted(VECTORS.glob("*.json"))


@pytest.mark.parametrize("path", _vectors(), ids=lambda p: p.stem)
def test_vector(path: Path) -> None:
    """Each stored vector opens, or fails with the error its file names."""
    vec = json.loads(path.read_text())
    key = bytes.fromhex(vec["key_hex"]) if "key_hex" in vec else None

    def run() -> object:
        header = envelope.load_header(vec["header"].encode())
        nonlocal key
        if header.kdf is not None:
            key = envelope.derive_key(vec["passphrase"].encode(), header.kdf)
        assert key is not None
        envelope.check_key(header, key)
        if "secret_b64" in vec:
            return envelope.open_secret(key, vec["ref"], base64.b64decode(vec["secret_b64"]))
        return None

    if vec["expect"] == "ok":
        result = run()
        if "value" in vec:
            assert result == (vec["version"], vec["value"].encode())
    else:
        with pytest.raises(EnvelopeError, match=vec["expect"]):
            run()


def test_vectors_present() -> None:
    """The vector directory holds both passing and failing cases."""
    kinds = {json.loads(p.read_text())["expect"] == "ok" for p in _vectors()}
    assert kinds == {True, False}
