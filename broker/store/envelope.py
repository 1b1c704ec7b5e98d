"""The file vault's on-disk format, as pure functions (no files, no locks).

Header (`vault/header.json`): how to get the vault key (Argon2id parameters and salt, or
"a key file") and a key check: a known plaintext sealed under the key with the header's
parameters as associated data. A wrong passphrase or key file fails the check before any
secret is touched, and a header whose parameters were edited fails it too.

Secret file: MAGIC | version (u64 BE) | nonce (24) | XChaCha20-Poly1305 ciphertext, with
the ref and version as associated data, so a ciphertext copied to another ref (or rolled
back to another version under the same name) does not decrypt.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

FORMAT = "secret-broker-vault"
MAGIC = b"SBV1"
KEY_BYTES = 32
NONCE_BYTES = 24
_CHECK_PLAINTEXT = b"secret-broker vault key check v1"

# RFC 9106's second recommended option is the floor; the ceiling keeps a tampered header
# from making an unlock hang or exhaust memory (age caps scrypt's work factor likewise).
KDF_DEFAULT = {"m": 65536, "t": 3, "p": 4}
KDF_FLOOR = {"m": 65536, "t": 3, "p": 1}
KDF_CEILING = {"m": 1048576, "t": 16, "p": 16}
SALT_BYTES = (16, 64)


class EnvelopeError(Exception):
    """The header or a secret file is malformed, tampered with, or under another key."""


@dataclass(frozen=True)
class KdfParams:
    m: int  # memory, KiB
    t: int  # iterations
    p: int  # lanes
    salt: bytes


@dataclass(frozen=True)
class Header:
    unlock: str  # "passphrase" | "keyfile"
    kdf: KdfParams | None
    check: bytes

    def associated_data(self) -> bytes:
        kdf = self.kdf
        params = "" if kdf is None else f"{kdf.m}:{kdf.t}:{kdf.p}:{kdf.salt.hex()}"
        return f"{FORMAT}/1/{self.unlock}/{params}".encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EnvelopeError(f"vault header: {what} must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise EnvelopeError(f"vault header: {what} is not valid base64") from None


def new_kdf_params() -> KdfParams:
    return KdfParams(salt=os.urandom(16), **KDF_DEFAULT)


def derive_key(passphrase: bytes, kdf: KdfParams) -> bytes:
    # Imported here: a vault opened by key file (and `exec` on it) never needs Argon2.
    from argon2.exceptions import HashingError
    from argon2.low_level import Type, hash_secret_raw

    _check_bounds(kdf)
    try:
        return hash_secret_raw(
            passphrase, kdf.salt, time_cost=kdf.t, memory_cost=kdf.m, parallelism=kdf.p,
            hash_len=KEY_BYTES, type=Type.ID,
        )
    except HashingError as exc:
        raise EnvelopeError(f"vault key derivation failed: {exc}") from None


def _check_bounds(kdf: KdfParams) -> None:
    for name in ("m", "t", "p"):
        value = getattr(kdf, name)
        if not KDF_FLOOR[name] <= value <= KDF_CEILING[name]:
            raise EnvelopeError(
                f"vault header: KDF parameter {name}={value} is outside "
                f"{KDF_FLOOR[name]}..{KDF_CEILING[name]} (tampered or too weak)"
            )
    if not SALT_BYTES[0] <= len(kdf.salt) <= SALT_BYTES[1]:
        raise EnvelopeError("vault header: salt length out of range")


def make_header(key: bytes, unlock: str, kdf: KdfParams | None) -> Header:
    draft = Header(unlock, kdf, b"")
    nonce = os.urandom(NONCE_BYTES)
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
        _CHECK_PLAINTEXT, draft.associated_data(), nonce, key
    )
    return Header(unlock, kdf, nonce + sealed)


def check_key(header: Header, key: bytes) -> None:
    """Raise EnvelopeError unless `key` is the vault's key."""
    nonce, sealed = header.check[:NONCE_BYTES], header.check[NONCE_BYTES:]
    try:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed, header.associated_data(), nonce, key
        )
    except CryptoError:
        raise EnvelopeError("key check failed") from None
    if plain != _CHECK_PLAINTEXT:
        raise EnvelopeError("key check failed")


def dump_header(header: Header) -> bytes:
    doc: dict[str, object] = {"format": FORMAT, "version": 1, "unlock": header.unlock}
    if header.kdf is not None:
        k = header.kdf
        doc["kdf"] = {"alg": "argon2id", "m": k.m, "t": k.t, "p": k.p, "salt": _b64(k.salt)}
    doc["check"] = _b64(header.check)
    return (json.dumps(doc, indent=2) + "\n").encode()


def load_header(data: bytes) -> Header:
    """Parse strictly and hold KDF parameters to the floor and ceiling."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # deep nesting is a tampered file too, not a crash
        raise EnvelopeError("vault header is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1:
        raise EnvelopeError("vault header: not a secret-broker vault (version 1)")
    unlock = doc.get("unlock")
    kdf: KdfParams | None = None
    if unlock == "passphrase":
        raw = doc.get("kdf")
        if not isinstance(raw, dict) or raw.get("alg") != "argon2id":
            raise EnvelopeError("vault header: kdf must be an argon2id table")
        ints = {n: raw.get(n) for n in ("m", "t", "p")}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise EnvelopeError(f"vault header: KDF parameter {name} must be an integer")
        kdf = KdfParams(
            m=int(raw["m"]), t=int(raw["t"]), p=int(raw["p"]), salt=_unb64(raw.get("salt"), "salt")
        )
        _check_bounds(kdf)
    elif unlock != "keyfile":
        raise EnvelopeError("vault header: unlock must be 'passphrase' or 'keyfile'")
    check = _unb64(doc.get("check"), "check")
    if len(check) != NONCE_BYTES + len(_CHECK_PLAINTEXT) + 16:
        raise EnvelopeError("vault header: key check has the wrong length")
    return Header(unlock, kdf, check)


def _secret_ad(ref: str, version: int) -> bytes:
    return b"secret-broker/secret/v1\x00" + ref.encode() + b"\x00" + struct.pack(">Q", version)


def seal_secret(key: bytes, ref: str, version: int, value: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(value, _secret_ad(ref, version), nonce, key)
    return MAGIC + struct.pack(">Q", version) + nonce + sealed


def open_secret(key: bytes, ref: str, blob: bytes) -> tuple[int, bytes]:
    """Return (version, value), or raise EnvelopeError naming the ref."""
    head = len(MAGIC) + 8 + NONCE_BYTES
    if len(blob) < head + 16 or not blob.startswith(MAGIC):
        raise EnvelopeError(f"vault file for @{ref} is truncated or not a vault file")
    (version,) = struct.unpack(">Q", blob[len(MAGIC) : len(MAGIC) + 8])
    nonce = blob[len(MAGIC) + 8 : head]
    try:
        value = crypto_aead_xchacha20poly1305_ietf_decrypt(
            blob[head:], _secret_ad(ref, version), nonce, key
        )
    except CryptoError:
        raise EnvelopeError(
            f"vault file for @{ref} failed authentication (corrupted, tampered with, "
            "or copied from another secret)"
        ) from None
    return version, value
