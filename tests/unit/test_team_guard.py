"""broker.team.guard: the pre-commit content scan finds real keys, tokens and stored values,
passes public material, and never carries the secret in what it reports."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyrage
import pytest

from broker.team.guard import RULES, Finding, scan_blob

_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_TOKEN_BODY = "Zk3_pQ-9xYv2LmN8aBcD7eFgHiJ"  # 27 chars of the token alphabet

_PUTTY_KEY = """\
PuTTY-User-Key-File-3: ssh-ed25519
Encryption: none
Comment: eddsa-key-20240101
Public-Lines: 2
AAAAC3NzaC1lZDI1NTE5AAAAIJ5H0tWJqU8Y1y2fG7cV0bQnJx7bJm2S0kqzQ2b3
Private-Lines: 1
AAAAIFv0m1y9wC2m7oF0p6mXh2L3m4n5o6p7q8r9s0t1u2v3
Private-MAC: 4a6f2c1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b
"""

def _assert_quiet(findings: list[Finding], secret: str) -> None:
    """No finding may carry the secret: the hook prints them."""
    for finding in findings:
        assert finding.rule in RULES
        assert secret not in finding.path
        assert secret not in finding.rule
        assert secret not in repr(finding)


def _age_identity() -> str:
    return str(pyrage.x25519.Identity.generate())


def _openssl_key(algorithm: str) -> str:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: scripts/test installs it")
    argv = ["openssl", "genpkey", "-algorithm", algorithm]
    if algorithm == "EC":
        argv += ["-pkeyopt", "ec_paramgen_curve:P-256"]
    elif algorithm == "RSA":
        argv += ["-pkeyopt", "rsa_keygen_bits:2048"]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _openssl_traditional(algorithm: str) -> str:
    """The legacy `-----BEGIN RSA/EC PRIVATE KEY-----` form of a fresh key."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: scripts/test installs it")
    argv = ["openssl", "rsa", "-traditional"] if algorithm == "RSA" else ["openssl", "ec"]
    return subprocess.run(
        argv,
        input=_openssl_key(algorithm), check=True, capture_output=True, text=True,
    ).stdout


def _openssh_key(tmp_path: Path) -> str:
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen is missing: scripts/test installs it (openssh-client)")
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)],
        check=True, capture_output=True,
    )
    return key.read_text()


def test_rules_are_the_documented_set() -> None:
    """The hook and its docs name these rules; each has a one-line description."""
    assert list(RULES) == [
        "age-secret-key", "pem-private-key", "openssh-private-key", "putty-private-key",
        "broker-token", "secret-file-name", "stored-value", "sbteam-file", "sbteam-pairing",
    ]
    assert all(text and "\n" not in text for text in RULES.values())


@pytest.mark.parametrize("lower", [False, True], ids=["upper", "lower"])
def test_age_identity(lower: bool) -> None:
    """A real age identity is found, also lower-cased (age accepts both)."""
    secret = _age_identity()
    secret = secret.lower() if lower else secret
    findings = scan_blob("keys/me.txt", f"# my key\n{secret}\n".encode())
    assert findings == [Finding("keys/me.txt", "age-secret-key")]
    _assert_quiet(findings, secret)


@pytest.mark.parametrize("lower", [False, True], ids=["upper", "lower"])
def test_age_post_quantum_identity(lower: bool) -> None:
    """The post-quantum `AGE-SECRET-KEY-PQ-1…` form counts too."""
    secret = "AGE-SECRET-KEY-PQ-1" + (_BECH32 * 2)[:60].upper()
    secret = secret.lower() if lower else secret
    findings = scan_blob("pq.key.txt", secret.encode())
    assert [f.rule for f in findings] == ["age-secret-key"]
    _assert_quiet(findings, secret)


@pytest.mark.parametrize("algorithm", ["RSA", "EC", "ED25519"])
def test_pem_private_key(algorithm: str) -> None:
    """PKCS#8 keys from openssl are found."""
    secret = _openssl_key(algorithm)
    assert "-----BEGIN PRIVATE KEY-----" in secret
    findings = scan_blob("deploy/tls.pem", secret.encode())
    assert findings == [Finding("deploy/tls.pem", "pem-private-key")]
    _assert_quiet(findings, secret)


@pytest.mark.parametrize("algorithm", ["RSA", "EC"])
def test_pem_traditional_private_key(algorithm: str) -> None:
    """The legacy `RSA PRIVATE KEY` / `EC PRIVATE KEY` headers are PEM keys as well."""
    secret = _openssl_traditional(algorithm)
    assert f"-----BEGIN {algorithm} PRIVATE KEY-----" in secret
    findings = scan_blob("old.key", secret.encode())
    assert [f.rule for f in findings] == ["pem-private-key"]
    _assert_quiet(findings, secret)


@pytest.mark.parametrize("header", [
    "-----BEGIN DSA PRIVATE KEY-----",
    "-----BEGIN ENCRYPTED PRIVATE KEY-----",
    "-----BEGIN PGP PRIVATE KEY BLOCK-----",
])
def test_pem_headers_of_other_kinds(header: str) -> None:
    """Every `… PRIVATE KEY` header, PGP's `… PRIVATE KEY BLOCK` included, is a PEM key."""
    assert [f.rule for f in scan_blob("k.asc", f"{header}\nAAAA\n".encode())] == [
        "pem-private-key"]


def test_openssh_private_key(tmp_path: Path) -> None:
    """An OpenSSH key is reported as such, not as a PEM key."""
    secret = _openssh_key(tmp_path)
    findings = scan_blob("home/.ssh/id_ed25519", secret.encode())
    assert findings == [Finding("home/.ssh/id_ed25519", "openssh-private-key")]
    _assert_quiet(findings, secret)


def test_putty_private_key() -> None:
    """A PuTTY key file is found by its first line."""
    findings = scan_blob("me.ppk", _PUTTY_KEY.encode())
    assert [f.rule for f in findings] == ["putty-private-key"]
    _assert_quiet(findings, _PUTTY_KEY)


@pytest.mark.parametrize("prefix", ["sbt_", "sbc_", "sbs_"])
@pytest.mark.parametrize("template", [
    "{}", "Authorization: Bearer {}\n", 'TOKEN="{}"\n', "x = '{}'", "url?t={}&a=1",
])
def test_broker_token(prefix: str, template: str) -> None:
    """A token behind start of text or any non-word character is found."""
    secret = prefix + _TOKEN_BODY
    findings = scan_blob("ci/env.sh", template.format(secret).encode())
    assert [f.rule for f in findings] == ["broker-token"]
    _assert_quiet(findings, secret)


@pytest.mark.parametrize("path", ["broker.token", "home/me/.broker/broker.token", "a/vault.key"])
def test_secret_file_name(path: str) -> None:
    """These names hold credentials whatever the content, even an empty file."""
    assert scan_blob(path, b"") == [Finding(path, "secret-file-name")]


@pytest.mark.parametrize("path", ["broker.token.example", "docs/vault.key.md", "my-vault.key"])
def test_similar_file_names_pass(path: str) -> None:
    """Only the exact last component counts."""
    assert scan_blob(path, b"hello\n") == []


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _b64url_unpadded(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


@pytest.mark.parametrize("encode", [str, _b64, _b64url_unpadded], ids=["raw", "b64", "b64url"])
def test_stored_value(encode: Callable[[str], str]) -> None:
    """A stored value is found as it is and in its base64 forms."""
    value = "s3cr3t-Pa55?>wörd~~"  # `?>` and `~~` make the two base64 alphabets differ
    shown = encode(value)
    assert _b64(value).rstrip("=") != _b64url_unpadded(value)
    findings = scan_blob("app/settings.py", f"PASSWORD = '{shown}'\n".encode(),
                         stored_values=["unrelated-value-1", value])
    assert findings == [Finding("app/settings.py", "stored-value")]
    _assert_quiet(findings, value)
    _assert_quiet(findings, shown)


def test_short_stored_values_are_ignored() -> None:
    """A value under 8 characters would match ordinary text, so it is skipped."""
    assert scan_blob("README.md", b"the admin user logs in\n", stored_values=["admin"]) == []


@pytest.mark.parametrize("text", [
    "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\n",
    "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "token = sbt_short\n",
    "mysbt_" + "a" * 30 + "\n",
    "AGE-SECRET-KEY-1… goes in your secret store, see `broker team identity`.\n",
    "# secret-broker\n\nKeeps secrets out of git. Run `broker guard install`.\n",
])
def test_harmless_text_passes(text: str) -> None:
    """Public keys, certificates, identifiers and prose are not findings."""
    assert scan_blob("README.md", text.encode()) == []


def test_public_age_recipient_of_a_real_identity_passes() -> None:
    """A recipient is public: committing it is the point of a team vault."""
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    assert scan_blob("team/recipients.txt", f"alice {recipient}\n".encode()) == []


def test_every_rule_at_most_once_in_rules_order(tmp_path: Path) -> None:
    """Many hits in one blob give one finding per rule, ordered as RULES is."""
    stored = "stored-secret-value"
    blob = "\n".join([
        f"sbs_{_TOKEN_BODY}", f"sbt_{_TOKEN_BODY}", _PUTTY_KEY, _openssh_key(tmp_path),
        "-----BEGIN EC PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----",
        _age_identity(), _age_identity().lower(), stored, stored,
    ]).encode()
    found = [f.rule for f in scan_blob("x/vault.key", blob, stored_values=[stored])]
    assert found == list(RULES)[:7]  # every content rule (the last two are about .sbteam/)


def test_binary_blob_with_a_key_in_the_middle() -> None:
    """10 MB of random bytes with one identity in the middle: found, as bytes, in one go."""
    secret = _age_identity()
    half = os.urandom(5 * 1024 * 1024)
    findings = scan_blob("assets/blob.bin", half + b"\0" + secret.encode() + b"\0" + half)
    assert [f.rule for f in findings] == ["age-secret-key"]
    _assert_quiet(findings, secret)


def test_invalid_utf8_does_not_break_the_scan() -> None:
    """Nothing is decoded: bytes that are not UTF-8 around a token are fine."""
    blob = b"\xff\xfe\x80 sbc_" + _TOKEN_BODY.encode() + b" \xc3\x28"
    assert [f.rule for f in scan_blob("b.dat", blob)] == ["broker-token"]


def test_team_files_must_be_well_formed_and_whole() -> None:
    """The staged `.sbteam/` files: anything but a roster, envelope, age file or fixed file
    is refused, and so is half a secret (an envelope without its .age, or the reverse)."""
    from broker.team import edit
    from broker.team.guard import scan_team_files
    from broker.team.keys import Identity
    from broker.team.verify import Marks, Verified, verify_team

    actor = edit.Actor("alice", Identity.generate(), "2026-01-01T00:00:00Z")
    files = edit.apply({}, edit.new_team("a" * 32, "acme", actor))
    team = verify_team(None, Marks(), files)
    assert isinstance(team, Verified)
    files = edit.apply(files, edit.change_roster(team, actor, groups=["llm"]))
    team = verify_team(None, Marks(), files)
    assert isinstance(team, Verified)
    files = edit.apply(files, edit.set_secret(team, "llm", "k", "value-0123456789", actor,
                                              provider="p", kind="api_key"))
    assert scan_team_files(files) == []
    age, envelope = ".sbteam/secrets/llm/k.age", ".sbteam/secrets/llm/k.json"
    broken = {
        "sbteam-file": {**files, ".sbteam/notes.txt": b"hi"},
        "sbteam-pairing": {k: v for k, v in files.items() if k != age},
    }
    for rule, staged in broken.items():
        assert [f.rule for f in scan_team_files(staged)] == [rule]
    not_json = {**files, envelope: b"{not json"}
    assert [f.rule for f in scan_team_files(not_json)] == ["sbteam-file", "sbteam-pairing"]
