"""The broker serves a team: a real daemon on the CI host's home and clone, a teammate
rotating and pushing from another clone, the real OpenAI SDK through the gateway, and a
local stand-in upstream that checks which key arrives."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from broker.core.errors import BrokerError
from tests.conftest import CANARY, Daemon, grant, scan, start_daemon, wait_for, write_grants
from tests.support.mcp import agent
from tests.support.sdk_clients import openai_client
from tests.support.standins import StandIn
from tests.support.team import (
    OPENAI,
    TAMPER,
    VALUE,
    World,
    add_local_clash,
    blob,
    git,
    write_file,
)

ROTATED = "sk-rotated-team-canary-0123456789"
TEAM_REF = "@acme.openai_api_key"


@dataclass
class Served:
    world: World
    daemon: Daemon
    upstream: StandIn

    def lease_status(self, ref: str) -> int | str:
        """A lease's value, or the error's HTTP status."""
        try:
            return str(self.daemon.client().lease(ref, "llm.chat")["value"])
        except BrokerError as exc:
            return exc.status

    def events(self, name: str) -> list[dict[str, object]]:
        lines = (self.world["ci"].cli.home / "audit.log").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == name]


@pytest.fixture
def served(world: World) -> Iterator[Served]:
    ci = world["ci"]
    upstream = StandIn("openai", VALUE).start()
    config = ci.cli.home / "config.toml"
    config.write_text(config.read_text() + f'\n[providers.openai]\nbase_url = '
                      f'"{upstream.base_url}"\nsecret_ref = "acme.openai_api_key"\n')
    ci.cli.add("@local_key", CANARY)
    hosts = f'"{upstream.host}"'
    write_grants(ci.cli.home, grant("acme.openai_api_key", hosts=hosts)
                 + grant("local_key", hosts=hosts) + grant("acme.db_password", hosts=hosts))
    daemon = start_daemon(ci.cli.home, ci.cli.env)
    yield Served(world, daemon, upstream)
    if daemon.proc.poll() is None:
        daemon.proc.kill()
        daemon.proc.wait()
    upstream.stop()


def chat(s: Served) -> str:
    client = openai_client(s.daemon.url + "/proxy/openai", s.daemon.token)
    reply = client.chat.completions.create(model="gpt-4o-mini",  # type: ignore[union-attr]
                                           messages=[{"role": "user", "content": "hi"}])
    return str(reply.choices[0].message.content)


def test_a_pushed_rotation_reaches_the_gateway_after_team_pull(served: Served) -> None:
    s, bob, ci = served, served.world["bob"], served.world["ci"]
    assert chat(s)  # the stand-in answered only because the team's key arrived
    lease = s.daemon.client().lease(TEAM_REF, "llm.chat")
    assert lease["value"] == VALUE
    bob.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
           input=ROTATED)
    bob.ok("sync")
    s.upstream.expected_key = ROTATED
    out = ci.ok("pull")
    assert "serves it now" in out
    assert chat(s)  # the new key, through the real SDK
    assert lease["lease_id"] not in {x["lease_id"] for x in s.daemon.client().leases()}
    rotated = s.events("secret.rotated")
    assert rotated and rotated[-1]["secret_ref"] == "acme.openai_api_key"
    head = git(ci.clone, "rev-parse", "HEAD").strip()
    assert (rotated[-1]["team"], rotated[-1]["signer"], rotated[-1]["commit"]) == \
        ("acme", "bob", head)
    assert any(e["reason"] == "secret rotated" for e in s.events("lease.revoked"))
    status = s.daemon.client().status()
    assert status["teams"][0]["commit"] == head and status["teams"][0]["serving"]
    ci.cli.ok("audit", "verify")
    assert scan([s.daemon.log(), *ci.cli.outputs], VALUE, ROTATED, CANARY) == []


def test_a_new_commit_is_noticed_without_being_told(served: Served) -> None:
    s, bob, ci = served, served.world["bob"], served.world["ci"]
    bob.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
           input=ROTATED)
    bob.ok("sync")
    git(ci.clone, "pull", "-q", "--ff-only")  # plain git, no broker involved
    wait_for(lambda: s.lease_status(TEAM_REF) == ROTATED, timeout=10,
             what="the daemon to serve the pulled commit")


@pytest.mark.parametrize("rule", sorted(TAMPER))
def test_a_tampered_commit_fails_closed_for_the_team_only(served: Served, rule: str) -> None:
    s, ci = served, served.world["ci"]
    good = git(ci.clone, "rev-parse", "HEAD").strip()
    assert s.lease_status(TEAM_REF) == VALUE
    TAMPER[rule](s.world, ci.clone)
    git(ci.clone, "add", "-A", ".sbteam")
    git(ci.clone, "commit", "-q", "--no-verify", "-m", f"tamper {rule}")
    s.daemon.client().request("POST", "/v1/admin/teams/reload")
    assert s.lease_status(TEAM_REF) == 503
    with pytest.raises(BrokerError, match=f"rule {rule}"):
        s.daemon.client().lease(TEAM_REF, "llm.chat")
    assert s.lease_status("@local_key") == CANARY  # the home's own store keeps working
    s.daemon.client().request("POST", "/v1/admin/teams/reload")  # the same failure again
    failures = s.events("team.invalid") + s.events("team.rollback_refused")
    assert [e["rule"] for e in failures] == [rule]  # audited once
    git(ci.clone, "reset", "-q", "--hard", good)
    wait_for(lambda: s.lease_status(TEAM_REF) == VALUE, timeout=10,
             what="the daemon to come back on the valid commit")


def test_every_kind_of_rollback_is_refused_by_the_daemon(served: Served) -> None:
    s, alice, bob, ci = served, *(served.world[n] for n in ("alice", "bob", "ci"))
    bob.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
           input=ROTATED)
    bob.ok("sync")
    ci.ok("pull")
    assert s.lease_status(TEAM_REF) == ROTATED
    new = git(ci.clone, "rev-parse", "HEAD").strip()

    def revert() -> None:
        git(ci.clone, "revert", "--no-edit", "HEAD")

    def old_file() -> None:
        for suffix in (".age", ".json"):
            write_file(ci.clone, OPENAI + suffix, blob(ci.clone, f"{new}~1:{OPENAI}{suffix}"))
        git(ci.clone, "commit", "-q", "--no-verify", "-am", "old file")

    def force_push() -> None:
        git(alice.clone, "fetch", "-q", "origin")
        git(alice.clone, "push", "-q", "--force", "origin", f"{new}~1:main")
        git(ci.clone, "fetch", "-q", "origin")
        git(ci.clone, "reset", "-q", "--hard", "origin/main")

    for undo in (revert, old_file, force_push):
        undo()
        s.daemon.client().request("POST", "/v1/admin/teams/reload")
        assert s.lease_status(TEAM_REF) == 503, undo.__name__  # never the older value
        git(ci.clone, "reset", "-q", "--hard", new)
        s.daemon.client().request("POST", "/v1/admin/teams/reload")
        assert s.lease_status(TEAM_REF) == ROTATED
    assert s.events("team.rollback_refused")


def test_a_merge_conflict_never_reaches_a_request(served: Served) -> None:
    s, alice, ci = served, served.world["alice"], served.world["ci"]
    ignore = ".sbteam/.gitignore"
    for member, line in ((alice, "alice.tmp"), (ci, "ci.tmp")):
        path = member.clone / ignore
        path.write_text(path.read_text() + line + "\n")
        git(member.clone, "commit", "-q", "--no-verify", "-am", f"ignore {line}")
    git(alice.clone, "push", "-q", "origin", "HEAD:main")
    head = git(ci.clone, "rev-parse", "HEAD").strip()
    conflicted = git(ci.clone, "pull", "--no-rebase", "-q", "origin", "main", check=False)
    assert (ci.clone / ".git" / "MERGE_HEAD").exists(), conflicted
    s.daemon.client().request("POST", "/v1/admin/teams/reload")
    assert s.lease_status(TEAM_REF) == VALUE
    assert s.daemon.client().status()["teams"][0]["commit"] == head


def test_uncommitted_edits_and_locks_never_reach_a_request(served: Served) -> None:
    s, ci = served, served.world["ci"]
    (ci.clone / (OPENAI + ".age")).write_bytes(b"garbage")  # an edit, not committed
    (ci.clone / ".git" / "index.lock").write_text("")  # a pull or commit under way
    s.daemon.client().request("POST", "/v1/admin/teams/reload")
    assert s.lease_status(TEAM_REF) == VALUE


def test_team_refs_are_listed_read_only_and_may_not_clash(served: Served) -> None:
    s, ci = served, served.world["ci"]
    listed = {m["ref"]: m for m in json.loads(ci.cli.ok("list", "--json"))["secrets"]}
    assert listed["acme.openai_api_key"]["backend"] == "team:acme"
    assert listed["local_key"]["backend"] == "file-vault"
    admin = s.daemon.client().request("GET", "/v1/admin/secrets")["secrets"]
    team_row = next(m for m in admin if m["ref"] == "acme.openai_api_key")
    assert (team_row["backend"], team_row["read_only"]) == ("team:acme", True)
    inspected = json.loads(ci.cli.ok("inspect", TEAM_REF, "--json"))
    assert (inspected["signer"], inspected["group"]) == ("alice", "llm")
    proc = ci.cli("add", TEAM_REF, "--provider", "openai", "--kind", "api_key", "--stdin",
                  input="x-0123456789")
    assert proc.returncode == 1 and "team set" in proc.stderr
    with pytest.raises(BrokerError) as raised:
        s.daemon.client().request("PUT", "/v1/admin/secrets/acme.openai_api_key",
                                  {"value": "x-0123456789"})
    assert raised.value.status == 409 and raised.value.code == "read_only_backend"
    # A local secret under a served name: both are unavailable, and `check` says why.
    add_local_clash(ci, "@acme.jina_api_key", "local-clash-0123456789")
    write_grants(ci.cli.home, grant("acme.jina_api_key", hosts=f'"{s.upstream.host}"'))
    assert s.lease_status("@acme.jina_api_key") == 503
    report = json.loads(ci.cli("check", "--json").stdout)
    assert any("acme.jina_api_key" in e["message"] for e in report["errors"])


def test_a_checkout_it_cannot_trust_is_refused(served: Served) -> None:
    s, ci = served, served.world["ci"]
    os.chown(ci.clone, 65534, 65534)  # as another user's checkout would be
    try:
        s.daemon.client().request("POST", "/v1/admin/teams/reload")
        with pytest.raises(BrokerError, match="owned by another user"):
            s.daemon.client().lease(TEAM_REF, "llm.chat")
    finally:
        os.chown(ci.clone, os.getuid(), os.getgid())
    (ci.clone / ".git").rename(ci.clone / "git-moved")
    s.daemon.client().request("POST", "/v1/admin/teams/reload")
    with pytest.raises(BrokerError, match="not a git work tree"):
        s.daemon.client().lease(TEAM_REF, "llm.chat")
    assert s.lease_status("@local_key") == CANARY


def test_a_removal_arrives_on_sighup_and_ends_its_leases(served: Served) -> None:
    s, alice, ci = served, served.world["alice"], served.world["ci"]
    lease = s.daemon.client().lease(TEAM_REF, "llm.chat")
    alice.ok("rm", "@openai_api_key")
    alice.ok("sync")
    git(ci.clone, "pull", "-q", "--ff-only")
    os.kill(s.daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: s.lease_status(TEAM_REF) == 404, timeout=10,
             what="the tombstone to be served")
    removed = s.events("secret.removed")
    assert removed and (removed[-1]["secret_ref"], removed[-1]["team"]) == (
        "acme.openai_api_key", "acme")
    assert lease["lease_id"] not in {x["lease_id"] for x in s.daemon.client().leases()}


async def test_an_agent_uses_a_team_key_over_mcp_and_never_sees_it(served: Served) -> None:
    """Through `secret-broker mcp` the team's key reaches the upstream, and an answer echoing
    it (or the local value, or the agent's token) comes back scrubbed."""
    s, ci = served, served.world["ci"]
    token = json.loads(ci.cli.ok("token", "create", "--consumer", "default", "--json"))["token"]
    env = {**ci.cli.env, "SECRET_BROKER_TOKEN": token, "SECRET_BROKER_URL": s.daemon.url}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with agent(env, ci.cli.home) as a:
        listed = await a.ok("list_secrets")
        assert "acme.openai_api_key" in {e["ref"] for e in listed["secrets"]}
        answer = (await a.ok("call_provider", provider="openai", path="v1/chat/completions",
                             body=chat))["answer"]
        assert answer["choices"][0]["message"]["content"]  # the team's key was accepted
        # base64 is no key shape, so only the daemon's scrub of the values it holds (the
        # team's included) can catch that form.
        encoded = base64.b64encode(VALUE.encode()).decode()
        s.upstream.force = (200, json.dumps({"echo": [VALUE, encoded, CANARY, token]}).encode())
        echoed = (await a.ok("call_provider", provider="openai", path="v1/chat/completions",
                             body=chat))["answer"]
        assert echoed == {"echo": ["[redacted]"] * 4}
    assert [r.headers.get("authorization") for r in s.upstream.requests] == \
        [f"Bearer {VALUE}"] * 2
    assert scan([*a.everything(), s.daemon.log()], VALUE, encoded, CANARY, token) == []
