"""Team vaults with real git and real age: a bare remote, a clone per member, a home per
member (alice the admin, bob a writer, the CI host a reader), driven through the CLI.

Tampering is done the way an attacker with push access would: plain git and file edits,
committed with --no-verify. Values are proven through `exec` (a digest, never printed).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from broker.team import edit
from broker.team.format import parse_roster, roster_path
from broker.team.keys import Identity
from broker.team.verify import Marks, Verified, verify_team
from tests.conftest import grant, scan, write_grants
from tests.support.team import (
    GIT_ENV,
    OPENAI,
    SHA_K,
    TAMPER,
    VALUE,
    VALUE_2,
    World,
    add_local_clash,
    blob,
    git,
    new_member,
    sha,
    write_file,
)


def test_members_share_and_rotate_keys_through_git(world: World) -> None:
    alice, bob, ci = world["alice"], world["bob"], world["ci"]
    assert {m.digest() for m in (alice, bob, ci)} == {sha(VALUE)}
    assert alice.digest("@acme.db_password") == sha(VALUE_2)
    assert ci.exec_code("@acme.db_password") == 5  # not a reader of prod: cannot decrypt
    profiles = ci.cli.home / "profiles.toml"  # a profile under grants, as for local refs
    profiles.write_text('[profiles.agent]\nconsumer = "agent"\n'
                        'env = { K = "@acme.openai_api_key" }\n')
    profiles.chmod(0o600)
    assert ci.cli("exec", "--profile", "agent", "--", "true").returncode == 4  # no grant yet
    write_grants(ci.cli.home, grant("acme.openai_api_key", "agent", delivery='"env"'))
    assert ci.cli.ok("exec", "--profile", "agent", "--", *SHA_K).split()[0] == sha(VALUE)
    template, out = world.root / "svc.tpl", world.root / "svc.conf"
    template.write_text("key = {{ @acme.openai_api_key }}\n")
    ci.cli.ok("inject", "-i", str(template), "-o", str(out))
    assert out.read_text() == f"key = {VALUE}\n"
    out.unlink()
    assert bob.exec_code("@acme.nothing_here") == 3
    bob.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
           input="sk-rotated-by-bob-0123456789")
    bob.ok("sync")
    for m in (alice, ci):
        m.ok("pull")
        assert m.digest() == sha("sk-rotated-by-bob-0123456789")
    listed = json.loads(ci.ok("list", "--json"))
    openai = next(d for d in listed if d["ref"] == "openai_api_key")
    assert (openai["version"], openai["signer"], openai["readable_here"]) == (2, "bob", True)
    status = json.loads(ci.ok("status", "--json"))
    assert (status["member"], status["role"], status["groups"]) == ("ci", "reader", ["llm"])
    assert status["hook_installed"] is True
    assert ci.team("set", "@x", "--group", "llm", "--provider", "p", "--stdin",
                   input="v-0123456789").returncode == 2  # a reader cannot write
    report = json.loads(ci.cli("check", "--json").stdout)  # `check` covers the team too
    assert any(f["check"] == "team" and "one admin" in f["message"] for f in report["warnings"])
    audit = (alice.cli.home / "audit.log").read_text()
    for event in ("team.initialized", "team.member_added", "secret.added"):
        assert f'"event":"{event}"' in audit
    leaks = scan([*world.outputs(), audit, git(alice.clone, "log", "-p", "--all")],
                 VALUE, VALUE_2, "AGE-SECRET-KEY-1")
    assert leaks == []


def test_sync_between_clones_rebases_and_a_conflict_changes_nothing(world: World) -> None:
    alice, bob = world["alice"], world["bob"]
    alice.ok("set", "@jina_api_key", "--group", "llm", "--provider", "jina", "--stdin",
             input="jina-0123456789abcdef")
    bob.ok("set", "@voyage_api_key", "--group", "llm", "--provider", "voyage", "--stdin",
           input="voyage-0123456789abcdef")
    alice.ok("sync")
    bob.ok("sync")  # rebases bob's commit onto alice's
    alice.ok("pull")
    refs = {d["ref"] for d in json.loads(alice.ok("list", "--json"))}
    assert {"jina_api_key", "voyage_api_key", "openai_api_key"} <= refs
    # Both change the same ref: the second sync stops, naming the file, and changes nothing.
    alice.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
             input="from-alice-0123456789")
    bob.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
           input="from-bob-0123456789")
    alice.ok("sync")
    head = git(bob.clone, "rev-parse", "HEAD")
    failed = bob.team("sync")
    assert failed.returncode == 1 and "openai_api_key" in failed.stderr
    assert git(bob.clone, "rev-parse", "HEAD") == head
    assert git(bob.clone, "status", "--porcelain") == ""
    # A plain pull refuses the non-fast-forward (exit 1), also changing nothing.
    assert bob.team("pull").returncode == 1
    assert git(bob.clone, "rev-parse", "HEAD") == head


def test_a_removed_member_loses_what_is_written_after(world: World) -> None:
    alice, bob, ci = world["alice"], world["bob"], world["ci"]
    before = git(alice.clone, "rev-parse", "HEAD").strip()
    out = alice.ok("member", "remove", "bob")
    assert "@openai_api_key" in out and "db_password" not in out  # bob never read prod
    alice.ok("sync")
    for m in (bob, ci):
        m.ok("pull")
    assert bob.exec_code() == 5  # re-encrypted without bob
    assert ci.digest() == sha(VALUE)
    # What bob pulled before the removal stays his: the old commit still opens with his key.
    identity = bob.identity()
    assert isinstance(identity, Identity)
    old = verify_team(None, Marks(), _files(alice.clone, before))
    assert isinstance(old, Verified)
    assert edit.value_of(old, "openai_api_key", identity) == VALUE
    status = json.loads(alice.ok("status", "--json"))
    assert status["to_rotate"] == {"openai_api_key": ["bob"]}
    alice.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
             input="sk-after-bob-0123456789")
    assert json.loads(alice.ok("status", "--json"))["to_rotate"] == {}
    alice.ok("sync")
    ci.ok("pull")
    # bob's new signature is refused by everyone: a forged rotation does not verify.
    bob.ok("pull")
    team = verify_team(None, Marks(), _files(bob.clone, "HEAD"))
    assert isinstance(team, Verified)
    forged = edit.set_secret(team, "llm", "openai_api_key", "sk-evil-0123456789",
                             edit.Actor("bob", identity, "2026-01-01T00:00:00Z"),
                             provider="openai", kind="api_key")
    _commit_files(bob.clone, forged, "rotate")
    git(bob.clone, "push", "-q", "origin", "HEAD:main")
    pulled = ci.team("pull")
    assert pulled.returncode == 5 and "envelope-signature" in pulled.stderr
    assert ci.digest() == sha("sk-after-bob-0123456789")  # the checkout did not move


def _files(repo: Path, commit: str) -> dict[str, bytes]:
    from broker.team.gitrepo import Repo

    return Repo(repo).files(git(repo, "rev-parse", commit).strip())


def _commit_files(repo: Path, files: dict[str, bytes | None], message: str) -> None:
    for path, data in files.items():
        if data is None:
            (repo / path).unlink()
        else:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_bytes(data)
    git(repo, "add", "-A", ".sbteam")
    git(repo, "commit", "-q", "--no-verify", "-m", message)


@pytest.mark.parametrize("rule", sorted(TAMPER))
def test_each_rule_broken_in_git_is_named_and_refused(world: World, rule: str) -> None:
    ci = world["ci"]
    good = git(ci.clone, "rev-parse", "HEAD").strip()
    TAMPER[rule](world, ci.clone)
    git(ci.clone, "add", "-A", ".sbteam")
    git(ci.clone, "commit", "-q", "--no-verify", "-m", f"tamper: {rule}")
    checked = ci.team("check", "--json")
    assert checked.returncode == 1
    errors = json.loads(checked.stdout)["errors"]
    assert any(f"(rule {rule}:" in e for e in errors), errors
    assert ci.exec_code() == 5
    assert f'"rule":"{rule}"' in (ci.cli.home / "audit.log").read_text()
    git(ci.clone, "reset", "-q", "--hard", good)
    assert ci.digest() == sha(VALUE)  # back by itself with a valid commit


def test_rollbacks_are_refused_until_a_trust_reset(world: World) -> None:
    alice, ci = world["alice"], world["ci"]
    alice.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
             input="sk-v2-0123456789")
    alice.ok("sync")
    ci.ok("pull")
    assert ci.digest() == sha("sk-v2-0123456789")
    new = git(ci.clone, "rev-parse", "HEAD").strip()
    # 1. git revert: a new commit, descending, whose envelope seq went back.
    git(ci.clone, "revert", "--no-edit", "HEAD")
    assert ci.exec_code() == 5
    assert "rollback" in ci.team("check").stdout
    git(ci.clone, "reset", "-q", "--hard", new)
    # 2. An old file copied back into a new commit.
    for suffix in (".age", ".json"):
        write_file(ci.clone, OPENAI + suffix, blob(ci.clone, f"{new}~1:{OPENAI}{suffix}"))
    git(ci.clone, "commit", "-q", "--no-verify", "-am", "old file")
    assert ci.exec_code() == 5
    # 3. A force-pushed remote: the old history comes back as the branch.
    git(alice.clone, "push", "-q", "--force", "origin", f"{new}~1:main")
    git(ci.clone, "fetch", "-q", "origin")
    git(ci.clone, "reset", "-q", "--hard", "origin/main")
    assert ci.exec_code() == 5
    assert '"event":"team.rollback_refused"' in (ci.cli.home / "audit.log").read_text()
    # A deliberate rewrite is accepted with trust-reset (audited), and only then.
    ci.ok("trust-reset", "--to", "HEAD")
    assert ci.digest() == sha(VALUE)
    assert '"event":"team.trust_reset"' in (ci.cli.home / "audit.log").read_text()


def test_bad_input_is_refused_and_changes_nothing(world: World) -> None:
    alice, bob = world["alice"], world["bob"]
    config = (alice.cli.home / "config.toml").read_text()
    head = git(alice.clone, "rev-parse", "HEAD")
    card = bob.ok("card").strip()
    cases = [
        (["member", "add", "carol", "--card", card, "--role", "reader"], 2, "bob's"),
        (["member", "add", "bob2", "--card", card[:-6] + "AAAAAA", "--role", "reader"], 2,
         "card"),
        (["grant", "bob", "nope"], 2, "llm, prod"),
        (["group", "add", "Bad Name"], 2, "a-z 0-9"),
        (["set", "@k", "--group", "nope", "--provider", "p", "--stdin"], 2, "llm, prod"),
        (["set", "@k", "sk-on-the-command-line", "--group", "llm", "--provider", "p"], 2, ""),
        (["member", "remove", "nobody"], 3, "nobody"),
    ]
    for args, code, words in cases:
        proc = alice.team(*args, input="v-0123456789")
        assert proc.returncode == code, (args, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    # A dirty .sbteam/ stops a change before anything is written.
    (alice.clone / roster_path(1)).write_text((alice.clone / roster_path(1)).read_text() + " ")
    proc = alice.team("group", "add", "new")
    assert proc.returncode == 1 and "uncommitted" in proc.stderr
    git(alice.clone, "checkout", "-q", "--", ".sbteam")
    # A wrong fingerprint: exit 5, nothing registered.
    carol = new_member(world, "carol")
    proc = carol.team("join", "--fingerprint", "0" * 64, "--as", "carol")
    assert proc.returncode == 5 and "fingerprint" in proc.stderr
    assert "[teams" not in (carol.cli.home / "config.toml").read_text()
    assert (alice.cli.home / "config.toml").read_text() == config
    assert git(alice.clone, "rev-parse", "HEAD") == head
    # A push the remote rejects: sync says so (exit 1).
    hook = world.remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'rejected by policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    alice.ok("group", "add", "later")
    proc = alice.team("sync")
    assert proc.returncode == 1 and "rejected" in proc.stderr


# --- the pre-commit guard ----------------------------------------------------------------


def _commit_code(repo: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "commit", "-q", "-m", "x"], cwd=repo, capture_output=True,
                          text=True, env={**(env or os.environ), **GIT_ENV}, check=False)


def test_the_guard_refuses_keys_in_staged_blobs(world: World) -> None:
    bob = world["bob"]
    env = bob.cli.env
    key = "AGE-SECRET-KEY-1" + "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L" * 2
    cases = {  # rule: (file content, the part that must never be printed)
        "age-secret-key": (key, key[16:]),
        "pem-private-key": ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n"
                            "-----END PRIVATE KEY-----\n", "MIIEvQIBADANBg"),
        "openssh-private-key": ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE\n",
                                "b3BlbnNzaC1rZXktdjE"),
        "putty-private-key": ("PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\n",
                              "Private-Lines"),
        "broker-token": ("token = sbt_" + "a" * 40 + "\n", "a" * 40),
    }
    for rule, (text, secret) in cases.items():
        (bob.clone / "leak.txt").write_text(text)
        git(bob.clone, "add", "leak.txt")
        (bob.clone / "leak.txt").unlink()  # gone from the working tree, still staged
        refused = _commit_code(bob.clone, env)
        assert refused.returncode != 0 and "leak.txt" in refused.stderr, rule
        assert secret not in refused.stderr
        git(bob.clone, "rm", "-q", "--cached", "leak.txt")
    (bob.clone / "vault.key").write_text("x")
    git(bob.clone, "add", "vault.key")
    assert _commit_code(bob.clone, env).returncode != 0
    git(bob.clone, "rm", "-q", "--cached", "vault.key")
    # A stored value of this machine (bob's store holds none: add one), raw.
    bob.cli.add("@local_key", "sk-local-canary-0123456789")
    (bob.clone / "notes.txt").write_text("key: sk-local-canary-0123456789\n")
    git(bob.clone, "add", "notes.txt")
    refused = _commit_code(bob.clone, env)
    assert refused.returncode != 0 and "stored" in refused.stderr
    assert "sk-local-canary" not in refused.stderr
    git(bob.clone, "rm", "-q", "--cached", "notes.txt")


def test_the_guard_goes_first_and_fails_closed(world: World) -> None:
    bob = world["bob"]
    hook = bob.clone / ".git" / "hooks" / "pre-commit"
    bob.ok("hook", "uninstall")
    hook.write_text("#!/bin/sh\necho existing hook\nexit 0\n")
    hook.chmod(0o755)
    bob.ok("hook", "install")
    assert hook.read_text().splitlines()[0] == "#!/bin/sh"
    assert "existing hook" in hook.read_text()
    (bob.clone / "leak.txt").write_text("sbt_" + "b" * 40)
    git(bob.clone, "add", "leak.txt")
    assert _commit_code(bob.clone, bob.cli.env).returncode != 0
    # Without secret-broker on PATH the hook fails the commit instead of skipping the scan.
    bare = {**bob.cli.env, "PATH": "/usr/bin:/bin"}
    missing = _commit_code(bob.clone, bare)
    assert missing.returncode != 0
    # Skipped with --no-verify: `team check --ci` (no home needed) catches it in CI.
    git(bob.clone, "commit", "-q", "--no-verify", "-m", "skip the hook")
    ci_check = subprocess.run(["secret-broker", "team", "check", "--ci", "--dir",
                               str(bob.clone)], capture_output=True, text=True,
                              env={k: v for k, v in bob.cli.env.items()
                                   if k != "SECRET_BROKER_HOME"}, check=False)
    assert ci_check.returncode == 1 and "leak.txt" in ci_check.stdout
    assert "sbt_bbbb" not in ci_check.stdout


def test_team_refs_are_kept_apart_from_local_refs(world: World) -> None:
    ci = world["ci"]
    refused = ci.cli("add", "@acme.openai_api_key", "--provider", "openai", "--kind",
                     "api_key", "--stdin", input="sk-local-0123456789")
    assert refused.returncode == 1 and "team set" in refused.stderr
    add_local_clash(ci, "@acme.openai_api_key", "sk-local-clash-0123456789")
    proc = ci.cli("exec", "--env", "K=@acme.openai_api_key", "--", "true")
    assert proc.returncode == 5 and "both a local secret" in proc.stderr
    roster = parse_roster(roster_path(1), (ci.clone / roster_path(1)).read_bytes())
    assert roster.team_name == "acme"


def test_the_emergency_path_opens_a_secret_with_the_age_tool(world: World) -> None:
    """Without the broker: the member's exported identity and Debian's `age` (then jq)."""
    ci = world["ci"]
    key_file = world.root / "ci-identity.txt"
    out = ci.ok("identity", "export", "-o", str(key_file))
    assert "AGE-SECRET-KEY" not in out
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert ci.team("identity", "export", "-o", str(key_file)).returncode == 2  # never over
    plain = subprocess.run(["age", "-d", "-i", str(key_file), str(ci.clone / (OPENAI + ".age"))],
                           capture_output=True, check=True).stdout
    assert len(plain) % 256 == 0
    assert json.loads(plain)["value"] == VALUE
    assert '"event":"team.identity_exported"' in (ci.cli.home / "audit.log").read_text()


def test_groups_revoke_tombstones_inspect_and_rekey(world: World) -> None:
    alice, bob = world["alice"], world["bob"]
    members = {m["name"]: m for m in json.loads(alice.ok("member", "list", "--json"))}
    assert members["ci"]["role"] == "reader" and members["bob"]["groups"] == ["llm"]
    out = alice.ok("revoke", "bob", "llm")
    assert "@openai_api_key" in out
    assert json.loads(alice.ok("status", "--json"))["to_rotate"] == {"openai_api_key": ["bob"]}
    alice.ok("grant", "bob", "llm")
    inspected = json.loads(alice.ok("inspect", "@openai_api_key"))
    assert inspected["recipients"] == ["alice", "bob", "ci"]
    assert inspected["served_as"] == "@acme.openai_api_key"
    assert "nothing to re-encrypt" in alice.ok("rekey")
    alice.ok("rm", "@openai_api_key")
    alice.ok("sync")
    bob.ok("pull")
    assert bob.exec_code() == 3  # removed with a signed tombstone: no such ref
    assert alice.team("group", "remove", "llm").returncode == 2  # still has members
    alice.ok("group", "add", "empty")
    assert "empty" in json.loads(alice.ok("status", "--json"))["team_groups"]
    alice.ok("group", "remove", "empty")
    assert json.loads(alice.ok("status", "--json"))["team_groups"] == ["llm", "prod"]
    assert bob.team("member", "remove", "ci").returncode == 2  # only an admin


def test_old_ciphertexts_copied_back_are_named_by_the_recipient_rules(world: World) -> None:
    """Files signed by a real admin but encrypted for an older roster: CI (no home, no
    rollback memory) names the recipient rule; a member's machine refuses them as rollback."""
    alice = world["alice"]
    files = [OPENAI + ".age", OPENAI + ".json"]
    before = {f: (alice.clone / f).read_bytes() for f in files}
    alice.ok("member", "remove", "bob")  # re-encrypts without bob

    def copy_back_and_check(rule: str) -> None:
        for name, data in before.items():
            (alice.clone / name).write_bytes(data)
        git(alice.clone, "commit", "-q", "--no-verify", "-am", f"old files: {rule}")
        ci_check = alice.team("check", "--ci", "--json")
        assert any(f"(rule {rule}:" in e for e in json.loads(ci_check.stdout)["errors"])
        assert alice.exec_code() == 5
        assert any("(rule rollback:" in e
                   for e in json.loads(alice.team("check", "--json").stdout)["errors"])
        git(alice.clone, "reset", "-q", "--hard", "HEAD~1")

    copy_back_and_check("revocation-incomplete")  # still encrypted to bob, who left
    card = world["bob"].ok("card", "--as", "bob2").strip().splitlines()[-1]
    alice.ok("member", "add", "bob2", "--card", card, "--role", "reader", "--group", "llm")
    before = {f: (alice.clone / f).read_bytes() for f in files}
    alice.ok("member", "add", "dave", "--card", Identity.generate().card("dave").text(),
             "--role", "reader", "--group", "llm")
    copy_back_and_check("recipients")  # dave, added since, cannot open it
