"""The team vault's files, as bytes in and frozen dataclasses out: no git, no keys, no disk.

Every JSON file is parsed strictly (a duplicate key, an unknown key or a wrong type is an
error naming the file and the key), written pretty-printed with sorted keys for readable
diffs, and signed over `domain + "\\n" + canonical JSON` with a domain per kind of object,
so a signature made for one kind never verifies as another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.core.refs import TEAM_NAME_RE

FORMAT = "sb-team/1"
DIR = ".sbteam"
ROLES = ("admin", "writer", "reader")
CARD_PREFIX = "sbteam-card:1:"
PAD = 256  # plaintexts are padded to a multiple of this, so a length tells little
DOMAINS = {kind: f"{FORMAT} {kind}" for kind in ("roster", "envelope", "tombstone", "card")}
FIXED_FILES = {  # files of .sbteam/ that are neither rosters nor secrets
    f"{DIR}/FORMAT": f"{FORMAT}\n".encode(),
    f"{DIR}/.gitattributes": b"*.age binary\n",
    f"{DIR}/.gitignore": b"# never commit private keys, tokens or environment files here\n"
                         b"*.key\n*.token\n.env\n.env.*\n*.pem\n",
}


class FormatError(Exception):
    """A file that breaks the format; `rule` names which of the verification rules."""

    def __init__(self, file: str, rule: str, detail: str) -> None:
        super().__init__(f"{file}: {detail}")
        self.file, self.rule, self.detail = file, rule, detail


# --- JSON ----------------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """What signatures cover: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def pretty(obj: Any) -> bytes:
    """What is committed: the same data, one key per line, for readable diffs."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def message(kind: str, body: Mapping[str, Any]) -> bytes:
    return DOMAINS[kind].encode() + b"\n" + canonical(body)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _no_duplicates(file: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(file, "parse", f"the key {key!r} appears twice")
            out[key] = value
        return out
    return hook


def load_json(file: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates(file))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(file, "parse", "not a UTF-8 JSON document") from None
    if not isinstance(doc, dict):
        raise FormatError(file, "parse", "not a JSON object")
    return doc


# A field's type: a Python type, or a tuple ("list", item type), ("map", value type),
# ("optional", type). Checked exactly: a bool is not an int, an int is not a float.
Spec = Any


def _check(file: str, key: str, value: Any, spec: Spec) -> None:
    if isinstance(spec, tuple):
        kind, inner = spec
        if kind == "optional":
            if value is not None:
                _check(file, key, value, inner)
            return
        if kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                _check(file, f"{key}[{i}]", item, inner)
            return
        if kind == "map" and isinstance(value, dict):
            for name, item in value.items():
                _check(file, f"{key}.{name}", item, inner)
            return
        raise FormatError(file, "parse", f"{key} must be a {'list' if kind == 'list' else 'map'}")
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise FormatError(file, "parse", f"{key} must be an object")
        fields(file, value, spec, prefix=f"{key}.")
        return
    if type(value) is not spec:
        raise FormatError(file, "parse", f"{key} must be a {spec.__name__}")


def fields(file: str, doc: Mapping[str, Any], spec: Mapping[str, Spec], prefix: str = "") -> None:
    """Exactly these keys, each of its type: refuse an unknown key or a missing one."""
    for key in doc:
        if key not in spec:
            raise FormatError(file, "parse", f"unknown key {prefix}{key}")
    for key, kind in spec.items():
        if key not in doc:
            raise FormatError(file, "parse", f"missing key {prefix}{key}")
        _check(file, prefix + key, doc[key], kind)


def check_name(file: str, what: str, name: str) -> str:
    if not TEAM_NAME_RE.fullmatch(name):
        raise FormatError(file, "parse", f"{what} {name!r} must be 1-64 of a-z 0-9 _ . - "
                                         "(starting with a letter or digit)")
    return name


# --- the roster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str
    role: str
    groups: tuple[str, ...]
    age: str  # the age recipient, age1…
    sign: str  # the Ed25519 public key, base64url

    def reads(self, group: str) -> bool:
        return self.role == "admin" or group in self.groups

    def writes(self, group: str) -> bool:
        return self.role == "admin" or (self.role == "writer" and group in self.groups)

    def entry(self) -> dict[str, Any]:
        return {"role": self.role, "groups": list(self.groups), "age": self.age,
                "sign": self.sign}


@dataclass(frozen=True)
class Exposure:
    """Refs a member could read when they lost access: to be rotated at the provider."""
    member: str
    generation: int  # the roster generation that took the access away
    why: str  # "removed" | "revoked"
    refs: tuple[str, ...]  # "group/ref"

    def entry(self) -> dict[str, Any]:
        return {"member": self.member, "generation": self.generation, "why": self.why,
                "refs": list(self.refs)}


@dataclass(frozen=True)
class Roster:
    team_id: str
    team_name: str
    generation: int
    previous: str | None  # SHA-256 of the previous generation's file
    created_at: str
    groups: tuple[str, ...]
    members: Mapping[str, Member]
    exposed: tuple[Exposure, ...] = ()
    signed_by: str = ""
    signature: str = ""

    def readers(self, group: str) -> dict[str, str]:
        """The group's readers, name -> age recipient: every admin and its members."""
        return {m.name: m.age for m in self.members.values() if m.reads(group)}

    def body(self) -> dict[str, Any]:
        return {"format": FORMAT, "team_id": self.team_id, "team_name": self.team_name,
                "generation": self.generation, "previous": self.previous,
                "created_at": self.created_at, "groups": list(self.groups),
                "members": {n: m.entry() for n, m in self.members.items()},
                "exposed": [e.entry() for e in self.exposed], "signed_by": self.signed_by}

    def file(self) -> bytes:
        return pretty({**self.body(), "signature": self.signature})


_MEMBER = {"role": str, "groups": ("list", str), "age": str, "sign": str}
_EXPOSURE = {"member": str, "generation": int, "why": str, "refs": ("list", str)}
_ROSTER = {"format": str, "team_id": str, "team_name": str, "generation": int,
           "previous": ("optional", str), "created_at": str, "groups": ("list", str),
           "members": ("map", _MEMBER), "exposed": ("list", _EXPOSURE), "signed_by": str,
           "signature": str}


def roster_path(generation: int) -> str:
    return f"{DIR}/roster/{generation:06d}.json"


def parse_roster(file: str, data: bytes) -> Roster:
    doc = load_json(file, data)
    fields(file, doc, _ROSTER)
    if doc["format"] != FORMAT:
        raise FormatError(file, "format", f"format {doc['format']!r} is not {FORMAT}")
    groups = tuple(check_name(file, "group", g) for g in doc["groups"])
    members = {}
    for name, entry in doc["members"].items():
        check_name(file, "member", name)
        if entry["role"] not in ROLES:
            raise FormatError(file, "parse", f"members.{name}.role must be one of "
                                             f"{', '.join(ROLES)}")
        unknown = [g for g in entry["groups"] if g not in groups]
        if unknown:
            raise FormatError(file, "parse", f"members.{name} names an unknown group {unknown[0]}")
        members[name] = Member(name, entry["role"], tuple(entry["groups"]), entry["age"],
                               entry["sign"])
    exposed = tuple(Exposure(e["member"], e["generation"], e["why"], tuple(e["refs"]))
                    for e in doc["exposed"])
    return Roster(doc["team_id"], doc["team_name"], doc["generation"], doc["previous"],
                  doc["created_at"], groups, members, exposed, doc["signed_by"],
                  doc["signature"])


# --- secrets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """What the signer says of one `.age` file (or, as a tombstone, of its removal)."""
    type: str  # "secret" | "tombstone"
    team_id: str
    group: str
    ref: str
    seq: int  # grows on every rewrite of this ref, re-encryption included
    version: int  # grows when the value changes
    value_generation: int  # the roster generation when the value was last set
    provider: str
    kind: str
    age_sha256: str | None  # None for a tombstone
    recipients: Mapping[str, str] = field(default_factory=dict)  # name -> age recipient
    roster_generation: int = 0
    written_at: str = ""
    signed_by: str = ""
    signature: str = ""

    @property
    def domain(self) -> str:
        return "tombstone" if self.type == "tombstone" else "envelope"

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "team_id": self.team_id, "group": self.group,
                "ref": self.ref, "seq": self.seq, "version": self.version,
                "value_generation": self.value_generation, "provider": self.provider,
                "kind": self.kind, "age_sha256": self.age_sha256,
                "recipients": dict(self.recipients), "roster_generation": self.roster_generation,
                "written_at": self.written_at, "signed_by": self.signed_by}

    def file(self) -> bytes:
        return pretty({**self.body(), "signature": self.signature})


_ENVELOPE = {"type": str, "team_id": str, "group": str, "ref": str, "seq": int, "version": int,
             "value_generation": int, "provider": str, "kind": str,
             "age_sha256": ("optional", str), "recipients": ("map", str),
             "roster_generation": int, "written_at": str, "signed_by": str, "signature": str}


def secret_paths(group: str, ref: str) -> tuple[str, str]:
    """The `.age` file and its envelope."""
    base = f"{DIR}/secrets/{group}/{ref}"
    return base + ".age", base + ".json"


def parse_envelope(file: str, data: bytes) -> Envelope:
    doc = load_json(file, data)
    fields(file, doc, _ENVELOPE)
    if doc["type"] not in ("secret", "tombstone"):
        raise FormatError(file, "parse", "type must be secret or tombstone")
    if (doc["type"] == "secret") != (doc["age_sha256"] is not None):
        raise FormatError(file, "parse", "age_sha256 is set for a secret and null for a "
                                         "tombstone")
    return Envelope(**doc)


def plaintext(team_id: str, group: str, ref: str, version: int, value: str) -> bytes:
    """What the `.age` file holds: the value bound to where it belongs, padded with spaces
    (JSON ignores them) to a multiple of PAD bytes."""
    text = canonical({"team_id": team_id, "group": group, "ref": ref, "version": version,
                      "value": value})
    return text + b" " * (-len(text) % PAD)


_PLAIN = {"team_id": str, "group": str, "ref": str, "version": int, "value": str}


def open_plaintext(file: str, data: bytes, envelope: Envelope) -> str:
    """The value, once the decrypted bytes are shown to belong to this envelope."""
    doc = load_json(file, data)
    fields(file, doc, _PLAIN)
    bound = (doc["team_id"], doc["group"], doc["ref"], doc["version"])
    if bound != (envelope.team_id, envelope.group, envelope.ref, envelope.version):
        raise FormatError(file, "binding", "the encrypted value belongs to another team, "
                                           "group, ref or version than its envelope")
    value: str = doc["value"]
    return value


def age_recipient_count(data: bytes) -> int:
    """How many X25519 recipients an age file's header holds (the `-> X25519` stanzas before
    `---`; age also writes a random "grease" stanza, which names nobody)."""
    head, sep, _ = data.partition(b"\n---")
    if not sep or not head.startswith(b"age-encryption.org/v1\n"):
        return -1
    return sum(1 for line in head.split(b"\n") if line.startswith(b"-> X25519 "))


# --- cards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """A member's public half: name, age recipient, Ed25519 key, and a self-signature."""
    name: str
    age: str
    sign: str
    sig: str

    def body(self) -> dict[str, str]:
        return {"name": self.name, "age": self.age, "sign": self.sign}

    def text(self) -> str:
        return CARD_PREFIX + b64(canonical({**self.body(), "sig": self.sig}))


def parse_card(text: str) -> Card:
    text = text.strip()
    if not text.startswith(CARD_PREFIX):
        raise FormatError("card", "parse", f"a card starts with {CARD_PREFIX}")
    try:
        raw = unb64(text[len(CARD_PREFIX):])
    except (binascii.Error, ValueError):
        raise FormatError("card", "parse", "the card is not base64url") from None
    doc = load_json("card", raw)
    fields("card", doc, {"name": str, "age": str, "sign": str, "sig": str})
    check_name("card", "member", doc["name"])
    return Card(**doc)
