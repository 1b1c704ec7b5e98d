"""Export and import through the real CLI: age files between homes with different backends.

The keychain side runs against the real Secret Service, so this module needs the D-Bus
session that scripts/test provides (`dbus-run-session -- scripts/with-keyring pytest …`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyrage
import pytest

from tests.conftest import CANARY, CANARY_2, Cli, base_env, grant, scan, write_grants
from tests.integration.test_keychain import instance_id, secret_service
from tests.integration.test_keychain import keychain_homes as keychain_homes  # a fixture

PASSPHRASE = "export passphrase, not the vault's"
SHA_V = ["sh", "-c", 'printf %s "$V" | sha256sum']  # proves the value without printing it
MANIFEST_KEYS = {"format", "version", "created_at", "secrets", "grants", "profiles"}
SECRET_KEYS = {"ref", "provider", "kind", "version", "created_at", "rotated_at", "value"}


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def digest_of(cli: Cli, ref: str) -> str:
    """The SHA-256 of the stored value, read back through exec."""
    return cli.ok("exec", "--env", f"V={ref}", "--", *SHA_V).split()[0]


def passphrase_env(where: Path, passphrase: str = PASSPHRASE) -> dict[str, str]:
    path = where / f"export-pass-{sha(passphrase)[:8]}"
    path.write_text(passphrase + "\n")
    path.chmod(0o600)
    return {"SECRET_BROKER_EXPORT_PASSPHRASE_FILE": str(path)}


def metadata(cli: Cli) -> dict[str, dict[str, Any]]:
    return {s["ref"]: s for s in json.loads(cli.ok("list", "--json"))["secrets"]}


def audited(cli: Cli, event: str) -> list[tuple[str, int]]:
    events = json.loads(cli.ok("audit", "--event", event, "--json"))["events"]
    return sorted((e["secret_ref"], e["version"]) for e in events)


def file_vault_home(where: Path) -> Cli:
    """A second file-vault home (key file), beside the `cli` fixture's."""
    other = Cli(where, base_env(where))
    other.ok("init", "--backend", "file-vault")
    return other


@pytest.fixture
def kc(keychain_homes: Any) -> Cli:
    """A keychain home in the real Secret Service (entries removed afterwards)."""
    assert os.environ.get("DBUS_SESSION_BUS_ADDRESS"), \
        "needs a Secret Service: dbus-run-session -- scripts/with-keyring pytest … (scripts/test)"
    home: Cli = keychain_homes("kc")
    return home


def test_keychain_to_file_vault_with_a_passphrase(kc: Cli, cli: Cli) -> None:
    """A passphrase export of a keychain home imports into a file vault: values, metadata,
    versions and times intact, each ref audited on both sides, no value in any output."""
    kc.add("@openai_api_key", CANARY)
    kc.ok("add", "@jina_token", "--provider", "jina", "--kind", "token", "--stdin",
          input=CANARY_2)
    kc.ok("rotate", "@jina_token", "--stdin", input=CANARY_2 + "-2")
    env = passphrase_env(cli.home.parent)
    export = cli.home.parent / "from-keychain.age"
    kc.ok("export", "--passphrase", "-o", str(export), env=env)
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    assert export.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")

    wrong = cli("import", str(export), env=passphrase_env(cli.home.parent, "not it"))
    assert wrong.returncode == 5 and "passphrase is wrong" in wrong.stderr
    assert metadata(cli) == {}
    out = cli.ok("import", str(export), env=env)
    assert "imported 2 secret(s) into the file-vault store" in out

    source, copied = metadata(kc), metadata(cli)
    assert sorted(copied) == ["jina_token", "openai_api_key"]
    for ref, meta in source.items():
        fields = ("provider", "kind", "version", "created_at", "rotated_at")
        assert [copied[ref][k] for k in fields] == [meta[k] for k in fields]
        assert (meta["backend"], copied[ref]["backend"]) == ("keychain", "file-vault")
    assert copied["jina_token"]["version"] == 2
    assert digest_of(cli, "@openai_api_key") == sha(CANARY)
    assert digest_of(cli, "@jina_token") == sha(CANARY_2 + "-2")

    assert audited(kc, "secret.exported") == [("jina_token", 2), ("openai_api_key", 1)]
    assert audited(cli, "secret.imported") == [("jina_token", 2), ("openai_api_key", 1)]
    for home in (kc, cli):
        assert "OK" in home.ok("audit", "verify")
    assert CANARY.encode() not in export.read_bytes()
    assert scan(kc.outputs + cli.outputs, CANARY, CANARY_2) == []


def test_file_vault_to_keychain_to_a_recipient(cli: Cli, kc: Cli) -> None:
    """An export to an X25519 recipient carries grants; the keychain home imports it with
    the identity file, and pyrage alone opens the file to the documented manifest."""
    cli.add("@openai_api_key", CANARY)
    grants = grant("openai_api_key")
    write_grants(cli.home, grants)
    identity = pyrage.x25519.Identity.generate()
    identity_file = cli.home.parent / "identity.txt"
    identity_file.write_text(f"# public key: {identity.to_public()}\n{identity}\n")
    identity_file.chmod(0o600)
    export = cli.home.parent / "to-recipient.age"
    cli.ok("export", "--to", str(identity.to_public()), "--with-grants", "-o", str(export))

    doc = json.loads(pyrage.decrypt(export.read_bytes(), [identity]))
    assert set(doc) == MANIFEST_KEYS
    assert (doc["format"], doc["version"], doc["grants"], doc["profiles"]) == (
        "secret-broker-export", 1, grants, None)
    [entry] = doc["secrets"]
    assert set(entry) == SECRET_KEYS
    assert (entry["ref"], entry["provider"], entry["value"]) == ("openai_api_key", "openai",
                                                                  CANARY)

    no_identity = kc("import", str(export))
    assert no_identity.returncode == 2 and "--identity FILE" in no_identity.stderr
    stranger = cli.home.parent / "stranger.txt"
    stranger.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    stranger.chmod(0o600)
    assert kc("import", str(export), "--identity", str(stranger)).returncode == 5
    kc.ok("import", str(export), "--identity", str(identity_file), "--with-grants")

    service = f"secret-broker:{instance_id(kc.home)}"
    assert secret_service().get_password(service, "openai_api_key") == CANARY
    assert digest_of(kc, "@openai_api_key") == sha(CANARY)
    assert metadata(kc)["openai_api_key"]["backend"] == "keychain"
    assert (kc.home / "secrets.grants.toml").read_text() == grants
    assert stat.S_IMODE((kc.home / "secrets.grants.toml").stat().st_mode) == 0o600
    assert audited(kc, "secret.imported") == [("openai_api_key", 1)]
    assert scan(kc.outputs + cli.outputs, CANARY) == []


def test_collisions_are_refused_unless_replace(cli: Cli) -> None:
    """Importing refs that exist names every one of them and imports nothing; --replace
    overwrites them with a version past the old one."""
    for ref, value in (("@a", CANARY), ("@b", CANARY_2), ("@c", "c-value")):
        cli.add(ref, value)
    identity = pyrage.x25519.Identity.generate()
    key = cli.home.parent / "key.txt"
    key.write_text(str(identity))
    key.chmod(0o600)
    export = cli.home.parent / "abc.age"
    cli.ok("export", "--to", str(identity.to_public()), "-o", str(export))

    other = file_vault_home(cli.home.parent / "other")
    other.add("@a", "old-a")
    other.add("@b", "old-b")
    other.ok("rotate", "@b", "--stdin", input="old-b-2")
    before = metadata(other)
    refused = other("import", str(export), "--identity", str(key))
    assert refused.returncode == 1
    assert "@a, @b already exist" in refused.stderr and "@c" not in refused.stderr
    assert metadata(other) == before
    assert digest_of(other, "@a") == sha("old-a")
    assert audited(other, "secret.imported") == []

    other.ok("import", str(export), "--identity", str(key), "--replace")
    after = metadata(other)
    assert {ref: m["version"] for ref, m in after.items()} == {"a": 2, "b": 3, "c": 1}
    assert [digest_of(other, r) for r in ("@a", "@b", "@c")] == [
        sha(CANARY), sha(CANARY_2), sha("c-value")]
    events = json.loads(other.ok("audit", "--event", "secret.imported", "--json"))["events"]
    assert [(e["secret_ref"], e["outcome"]) for e in events] == [
        ("a", "replaced"), ("b", "replaced"), ("c", "added")]
    assert scan(cli.outputs + other.outputs, CANARY, CANARY_2) == []


def test_export_never_writes_to_a_terminal_or_over_a_file(cli: Cli) -> None:
    """A terminal as output, an existing -o without --force and a bad recipient are refused
    before any value is read; a pipe works and `import -` reads it back."""
    cli.add("@a", CANARY)
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "broker", "export", "--to", recipient],
                              stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=cli.env, timeout=60, text=True)
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 2 and "is a terminal" in proc.stderr

    existing = cli.home.parent / "existing.age"
    existing.write_bytes(b"keep me")
    refused = cli("export", "--to", recipient, "-o", str(existing))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert existing.read_bytes() == b"keep me"
    bad = cli("export", "--to", "age1typo", "-o", str(cli.home.parent / "new.age"))
    assert bad.returncode == 2 and "not an age recipient" in bad.stderr
    assert audited(cli, "secret.exported") == []

    cli.ok("export", "--to", recipient, "-o", str(existing), "--force")
    assert pyrage.decrypt(existing.read_bytes(), [identity]).startswith(b"{")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    piped = subprocess.run([sys.executable, "-m", "broker", "export", "--to", recipient],
                           capture_output=True, stdin=subprocess.DEVNULL, env=cli.env,
                           timeout=60, check=True).stdout
    assert piped.startswith(b"age-encryption.org/v1\n-> X25519 ")

    key = cli.home.parent / "key.txt"
    key.write_text(str(identity))
    key.chmod(0o600)
    other = file_vault_home(cli.home.parent / "other")
    subprocess.run([sys.executable, "-m", "broker", "import", "-", "--identity", str(key)],
                   input=piped, capture_output=True, env=other.env, timeout=60, check=True)
    assert digest_of(other, "@a") == sha(CANARY)
    assert audited(cli, "secret.exported") == [("a", 1), ("a", 1)]


def test_an_age_file_that_is_not_an_export_is_refused(cli: Cli) -> None:
    """A valid age file whose payload is not a well-formed manifest imports nothing; a file
    that is not age at all is a usage error."""
    identity = pyrage.x25519.Identity.generate()
    key = cli.home.parent / "key.txt"
    key.write_text(str(identity))
    key.chmod(0o600)
    entry = {"ref": "a", "provider": "openai", "kind": "api_key", "version": 1,
             "created_at": "yesterday", "rotated_at": None, "value": CANARY}
    doc = {"format": "secret-broker-export", "version": 1, "created_at": "2026-01-01T00:00:00Z",
           "secrets": [entry], "grants": None, "profiles": None}
    forged = cli.home.parent / "forged.age"
    forged.write_bytes(pyrage.encrypt(json.dumps(doc).encode(), [identity.to_public()]))
    proc = cli("import", str(forged), "--identity", str(key))
    assert proc.returncode == 1
    assert "secrets[0]: created_at must be an RFC 3339 time" in proc.stderr
    plain = cli.home.parent / "plain.json"
    plain.write_text(json.dumps(doc))
    proc = cli("import", str(plain))
    assert proc.returncode == 2 and "is not an age file" in proc.stderr
    assert metadata(cli) == {}
    assert scan(cli.outputs, CANARY) == []
