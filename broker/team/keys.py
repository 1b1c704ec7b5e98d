"""A member's identity and what it does: age X25519 (encryption, pyrage) and Ed25519
(signing, PyNaCl). Pure computation: where the private halves are kept is the service's
business (the member's own secret store, never a file of its own)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import pyrage

from broker.team.format import Card, b64, message, unb64


class BadKey(Exception):
    """A key, card or ciphertext that does not work: the caller names the file and rule."""


@dataclass(frozen=True, repr=False)
class Identity:
    """Both private keys of one member. `repr` shows the public halves only."""

    age_secret: str  # AGE-SECRET-KEY-1…
    sign_seed: bytes  # 32 bytes

    @classmethod
    def generate(cls) -> Identity:
        return cls(str(pyrage.x25519.Identity.generate()),
                   bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def from_entry(cls, text: str) -> Identity:
        """From the store's internal entry (JSON with both private halves)."""
        try:
            doc = json.loads(text)
            return cls(doc["age"], unb64(doc["sign"]))
        except (ValueError, KeyError, TypeError):
            raise BadKey("the team identity in this home's store is damaged") from None

    def entry(self) -> str:
        return json.dumps({"age": self.age_secret, "sign": b64(self.sign_seed)})

    def __repr__(self) -> str:
        return f"Identity(recipient={self.recipient!r})"

    @property
    def recipient(self) -> str:
        return str(pyrage.x25519.Identity.from_str(self.age_secret).to_public())

    @property
    def verify_key(self) -> str:
        return b64(bytes(nacl.signing.SigningKey(self.sign_seed).verify_key))

    def sign(self, kind: str, body: Mapping[str, Any]) -> str:
        signed = nacl.signing.SigningKey(self.sign_seed).sign(message(kind, body))
        return b64(signed.signature)

    def card(self, name: str) -> Card:
        body = {"name": name, "age": self.recipient, "sign": self.verify_key}
        return Card(name, body["age"], body["sign"], self.sign("card", body))

    def decrypt(self, data: bytes) -> bytes:
        try:
            plain: bytes = pyrage.decrypt(data, [pyrage.x25519.Identity.from_str(self.age_secret)])
        except (pyrage.DecryptError, ValueError) as exc:
            raise BadKey(f"cannot decrypt ({exc})") from None
        return plain


def verify(kind: str, body: Mapping[str, Any], key: str, signature: str) -> bool:
    """Whether `signature` is `key`'s over this kind of object with this body."""
    try:
        nacl.signing.VerifyKey(unb64(key)).verify(message(kind, body), unb64(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError,
            TypeError):
        return False
    return True


def card_is_genuine(card: Card) -> bool:
    """The self-signature: both keys belong to whoever holds the signing key."""
    try:
        pyrage.x25519.Recipient.from_str(card.age)
    except (pyrage.RecipientError, ValueError):
        return False
    return verify("card", card.body(), card.sign, card.sig)


def encrypt(plain: bytes, recipients: Iterable[str]) -> bytes:
    try:
        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    except (pyrage.RecipientError, ValueError) as exc:
        raise BadKey(f"an age recipient is not valid ({exc})") from None
    out: bytes = pyrage.encrypt(plain, keys)
    return out
