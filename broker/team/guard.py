"""The pre-commit guard's content scan: which secret-leak rules a staged blob breaks.

Pure on purpose: the caller (the git hook) reads the blobs and prints the findings, so this
module can be tested without a repository and can never leak what it matched: a `Finding`
names the path and the rule, never the text.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from broker.team.format import (
    DIR,
    FIXED_FILES,
    Envelope,
    FormatError,
    parse_envelope,
    parse_roster,
)


@dataclass(frozen=True)
class Finding:
    """One rule one path breaks; deliberately without the matched text (it is the secret)."""

    path: str
    rule: str


RULES: dict[str, str] = {
    "age-secret-key": (
        "an age secret key (AGE-SECRET-KEY-1…): keep identities in your secret store, never in git"
    ),
    "pem-private-key": (
        "a PEM private key (-----BEGIN … PRIVATE KEY-----): keep private keys out of git; "
        "commit the public key or certificate instead"
    ),
    "openssh-private-key": (
        "an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----): keep it in ~/.ssh or an "
        "agent, never in git; commit the .pub file if needed"
    ),
    "putty-private-key": (
        "a PuTTY private key (PuTTY-User-Key-File-…): keep it out of git; "
        "commit the public key if needed"
    ),
    "broker-token": (
        "a secret-broker token (sbt_/sbc_/sbs_…): revoke it and fetch it at run time instead"
    ),
    "secret-file-name": (
        "a file named broker.token or vault.key: these hold credentials whatever they contain; "
        "remove it from the commit and add it to .gitignore"
    ),
    "stored-value": (
        "a value that is stored in the broker (raw or base64): rotate it and reference it by "
        "name instead"
    ),
    "sbteam-file": (
        "a file under .sbteam/ that is no well-formed roster, envelope, age file or fixed file: "
        "change the team only with `secret-broker team …`"
    ),
    "sbteam-pairing": (
        "a secret's envelope staged without its .age file, or the reverse: change the team "
        "only with `secret-broker team …`"
    ),
}

# Matched against the lower-cased blob: age accepts lower-cased identities, so the guard must
# too, and a literal lower-case prefix searches several times faster than re.IGNORECASE.
_AGE_LOWER = re.compile(rb"age-secret-key-(?:pq-)?1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{20,}")
# One pass finds both PEM and OpenSSH headers; the captured kind tells them apart. The kind is
# bounded so that a long run of capitals after "-----BEGIN " cannot make matching quadratic.
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64} )?PRIVATE KEY(?: BLOCK)?-----")
# The exact patterns anchor at a line start or behind a non-word byte (so `mysbt_…`, the tail of
# an identifier, is no token). The anchor stops `re` skipping ahead to the literal prefix, which
# makes a pass several times slower, so an unanchored prefilter goes first: most blobs stop there.
_PUTTY_PREFILTER = re.compile(rb"PuTTY-User-Key-File-[0-9]+:")
_PUTTY = re.compile(rb"^PuTTY-User-Key-File-[0-9]+:", re.MULTILINE)
# "At least 20" body characters: the first 20 decide, so neither pattern reads further.
_TOKEN_PREFILTER = re.compile(rb"sb[tcs]_[A-Za-z0-9_-]{20}")
_TOKEN = re.compile(rb"(?<![A-Za-z0-9_])sb[tcs]_[A-Za-z0-9_-]{20}")

_SECRET_FILE_NAMES = frozenset({"broker.token", "vault.key"})
_MIN_STORED_LEN = 8  # shorter values match too much ordinary text to be worth a block


def _found(prefilter: re.Pattern[bytes], exact: re.Pattern[bytes], data: bytes) -> bool:
    """Whether `exact` matches; `prefilter` (no anchor) first rules out most blobs quickly."""
    return prefilter.search(data) is not None and exact.search(data) is not None


def _pem_rules(data: bytes) -> set[str]:
    """Rules the PEM-style headers break: OpenSSH keys get their own rule, the rest are PEM."""
    found: set[str] = set()
    for m in _PEM.finditer(data):
        found.add("openssh-private-key" if m.group(1) == b"OPENSSH " else "pem-private-key")
        if len(found) == 2:
            break
    return found


def _stored_forms(value: str) -> Iterable[bytes]:
    """The byte strings that betray `value`: itself and its base64 forms.

    Padding is stripped: the unpadded form is a prefix of the padded one, so one search covers
    both.
    """
    raw = value.encode()
    yield raw
    yield base64.b64encode(raw).rstrip(b"=")
    yield base64.urlsafe_b64encode(raw).rstrip(b"=")


def _has_stored_value(data: bytes, stored_values: Sequence[str]) -> bool:
    return any(
        form in data
        for value in stored_values
        if len(value) >= _MIN_STORED_LEN
        for form in _stored_forms(value)
    )


def scan_blob(path: str, data: bytes, stored_values: Sequence[str] = ()) -> list[Finding]:
    """Every rule the blob breaks (each rule at most once per path), in RULES order.

    Binary blobs are scanned too, as bytes: a key pasted into a binary file is still a leak.
    """
    broken: set[str] = set()
    if _AGE_LOWER.search(data.lower()):
        broken.add("age-secret-key")
    broken |= _pem_rules(data)
    if _found(_PUTTY_PREFILTER, _PUTTY, data):
        broken.add("putty-private-key")
    if _found(_TOKEN_PREFILTER, _TOKEN, data):
        broken.add("broker-token")
    if path.rsplit("/", 1)[-1] in _SECRET_FILE_NAMES:
        broken.add("secret-file-name")
    if _has_stored_value(data, stored_values):
        broken.add("stored-value")
    return [Finding(path, rule) for rule in RULES if rule in broken]


def scan_team_files(files: Mapping[str, bytes]) -> list[Finding]:
    """The `.sbteam/` files about to be committed, each well-formed, each secret whole."""
    found: list[Finding] = []
    envelopes: dict[str, Envelope] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(DIR + "/"):
            continue
        try:
            if path in FIXED_FILES:
                if data != FIXED_FILES[path] and not path.endswith(("/.gitignore", "/FORMAT")):
                    raise FormatError(path, "parse", "changed")
            elif path.startswith(f"{DIR}/roster/") and path.endswith(".json"):
                parse_roster(path, data)
            elif path.startswith(f"{DIR}/secrets/") and path.endswith(".json"):
                envelopes[path] = parse_envelope(path, data)
            elif path.startswith(f"{DIR}/secrets/") and path.endswith(".age"):
                if not data.startswith(b"age-encryption.org/v1\n"):
                    raise FormatError(path, "parse", "not an age file")
            else:
                raise FormatError(path, "parse", "not a team file")
        except FormatError:
            found.append(Finding(path, "sbteam-file"))
    for path in files:
        if path.startswith(f"{DIR}/secrets/") and path.endswith(".age") \
                and path[:-4] + ".json" not in envelopes:
            found.append(Finding(path, "sbteam-pairing"))
    for path, envelope in envelopes.items():
        has_age = path[:-5] + ".age" in files
        if has_age != (envelope.type == "secret"):
            found.append(Finding(path, "sbteam-pairing"))
    return found
