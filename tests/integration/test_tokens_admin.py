"""Consumer tokens and the admin API, with the daemon as a real process."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from broker.client import BrokerClient
from broker.core.errors import BrokerError, Forbidden, Unauthorized
from tests.conftest import CANARY, CANARY_2, Cli, grant, scan, wait_for, write_grants
from tests.support.gateway import Broker
from tests.support.sdk_clients import openai_client


def grant_for(gateway: Broker, consumer: str) -> None:
    host = gateway.standins["openai"].host
    write_grants(gateway.cli.home, grant("openai_api_key", consumer,
                                         delivery='"http_header_inject", "native"',
                                         hosts=f'"{host}"'))
    client = gateway.daemon.client(unix=True)
    wait_for(lambda: client.status()["grants"]["count"] == 1, timeout=5, what="grants reload")


def create_token(cli: Cli, consumer: str, *extra: str) -> dict[str, Any]:
    return dict(json.loads(cli.ok("token", "create", "--consumer", consumer, "--json", *extra)))


def test_consumer_token_with_the_openai_sdk(gateway: Broker) -> None:
    """A granted consumer's own token works; upstream sees only the real key."""
    grant_for(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-a")
    assert token["token"].startswith("sbc_") and token["id"].startswith("tok_")
    client = openai_client(gateway.root("openai"), token["token"])
    emb = client.embeddings.create(model="m", input="hi")
    assert emb.data
    gateway.assert_only_real_key_upstream("openai", token["token"])
    issued = gateway.audit("lease.issued")
    assert issued[-1]["consumer"] == "agent-a"


def test_another_consumers_token_is_denied_before_upstream(gateway: Broker) -> None:
    """A token for an ungranted consumer gets the SDK's permission error; nothing is sent."""
    grant_for(gateway, "agent-a")
    other = create_token(gateway.cli, "agent-b")
    client = openai_client(gateway.root("openai"), other["token"])
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="m", input="hi")
    assert gateway.standins["openai"].requests == []


def test_claiming_another_consumer_is_refused(gateway: Broker) -> None:
    """X-Broker-Consumer naming someone else is 403 consumer_mismatch; its own name is fine."""
    grant_for(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-b")["token"]
    spoof = openai_client(gateway.root("openai"), token,
                          default_headers={"X-Broker-Consumer": "agent-a"})
    with pytest.raises(openai.PermissionDeniedError) as exc:
        spoof.embeddings.create(model="m", input="hi")
    assert exc.value.code == "consumer_mismatch"
    own = create_token(gateway.cli, "agent-a")["token"]
    same = openai_client(gateway.root("openai"), own,
                         default_headers={"X-Broker-Consumer": "agent-a"})
    assert same.embeddings.create(model="m", input="hi").data
    assert len(gateway.standins["openai"].requests) == 1


def test_revoked_token_fails_at_once_and_its_leases_end(gateway: Broker) -> None:
    """After `token revoke`, the next call is 401 and the consumer's leases are gone."""
    grant_for(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-a")
    client = openai_client(gateway.root("openai"), token["token"])
    client.embeddings.create(model="m", input="hi")
    owner = gateway.daemon.client(unix=True)
    assert [lease["consumer"] for lease in owner.leases()] == ["agent-a"]
    gateway.cli.ok("token", "revoke", token["id"])
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="m", input="hi")
    assert owner.leases() == []
    failed = gateway.audit("auth.failed")[-1]
    assert failed["token_id"] == token["id"]
    revoked = gateway.audit("token.revoked")[-1]
    assert revoked["token_id"] == token["id"]
    assert scan([(gateway.cli.home / "audit.log").read_text(), gateway.daemon.log()],
                token["token"]) == []


def test_expired_token_stops_working(gateway: Broker) -> None:
    """A token created with --ttl 1s is refused once its time is up."""
    grant_for(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-a", "--ttl", "1s")
    client = BrokerClient(url=gateway.daemon.url, token=token["token"])

    def refused() -> bool:
        try:
            client.health()
        except Unauthorized:
            return True
        return False

    wait_for(refused, timeout=10, what="the token to expire")


def test_consumer_token_cannot_reach_admin_routes(gateway: Broker) -> None:
    """Consumer tokens get 403 owner_only on /v1/admin/…, whatever consumer they hold."""
    token = create_token(gateway.cli, "agent-a")["token"]
    client = BrokerClient(url=gateway.daemon.url, token=token)
    for method, path in (("GET", "/v1/admin/secrets"), ("GET", "/v1/admin/tokens"),
                         ("POST", "/v1/admin/tokens"), ("GET", "/v1/admin/audit/verify")):
        with pytest.raises(Forbidden) as exc:
            client.request(method, path, {} if method == "POST" else None)
        assert exc.value.code == "owner_only"


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_admin_round_trip(cli: Cli, daemon_factory: Any, transport: str) -> None:
    """Add, list, inspect, rotate, explain, tokens, audit, verify, remove; no value comes back."""
    d = daemon_factory()
    c = d.client(unix=transport == "unix")
    responses: list[Any] = []

    def call(method: str, path: str, body: Any = None) -> Any:
        doc = c.request(method, path, body)
        responses.append(doc)
        return doc

    meta = call("POST", "/v1/admin/secrets", {"ref": "openai_api_key", "provider": "openai",
                                              "kind": "api_key", "value": CANARY})
    assert meta["version"] == 1 and meta["ref"] == "openai_api_key"
    assert [s["ref"] for s in call("GET", "/v1/admin/secrets")["secrets"]] == ["openai_api_key"]
    assert call("GET", "/v1/admin/secrets/openai_api_key")["fingerprint"].startswith("hmac")
    assert call("PUT", "/v1/admin/secrets/@openai_api_key", {"value": CANARY_2})["version"] == 2
    write_grants(d.home, grant("openai_api_key", "a", purposes='"llm.chat"', delivery='"native"',
                               hosts='"x.io"', ttl=60))
    wait_for(lambda: call("GET", "/v1/admin/grants")["grants"], timeout=5, what="reload")
    allow = call("POST", "/v1/admin/grants/explain", {
        "consumer": "a", "secret_ref": "@openai_api_key", "purpose": "llm.chat",
        "delivery": "native", "host": "x.io"})
    assert allow == {"decision": "allow", "grant": {"index": 0, "line": 1},
                     "reason": allow["reason"]}
    deny = call("POST", "/v1/admin/grants/explain", {
        "consumer": "a", "secret_ref": "openai_api_key", "purpose": "llm.embeddings",
        "delivery": "native"})
    assert deny["decision"] == "deny" and "llm.embeddings" in deny["reason"]
    created = call("POST", "/v1/admin/tokens", {"consumer": "a", "description": "test"})
    assert created["token"].startswith("sbc_")
    listed = call("GET", "/v1/admin/tokens")["tokens"]
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    assert call("DELETE", f"/v1/admin/tokens/{created['id']}")["revoked"] == [created["id"]]
    events = call("GET", "/v1/admin/audit?event=secret.&limit=5")["events"]
    assert [e["event"] for e in events] == ["secret.added", "secret.rotated"]
    assert all(e["actor"] == "admin" for e in events)
    verdict = call("GET", "/v1/admin/audit/verify")
    assert verdict["ok"] and verdict["first_bad_line"] is None and verdict["checked"] > 3
    assert call("DELETE", "/v1/admin/secrets/openai_api_key") == {"removed": "openai_api_key"}
    assert call("GET", "/v1/admin/secrets")["secrets"] == []
    blob = json.dumps(responses).replace(created["token"], "")  # shown once, at creation
    assert scan(blob, CANARY, CANARY_2) == []
    assert scan([d.log(), (d.home / "audit.log").read_text()], CANARY, CANARY_2,
                created["token"]) == []


@pytest.mark.parametrize("cli_args, method, path, body, exit_code, status, error", [
    (("add", "@k", "--provider", "openai", "--kind", "api_key", "--stdin"), "POST",
     "/v1/admin/secrets", {"ref": "k", "provider": "openai", "kind": "api_key", "value": "v"},
     1, 409, "secret_exists"),
    (("inspect", "@missing"), "GET", "/v1/admin/secrets/missing", None, 3, 404,
     "secret_not_found"),
    (("inspect", "@bad ref"), "GET", "/v1/admin/secrets/bad%20ref", None, 2, 400,
     "invalid_request"),
    (("add", "@k2", "--provider", "openai", "--kind", "weird", "--stdin"), "POST",
     "/v1/admin/secrets", {"ref": "k2", "provider": "openai", "kind": "weird", "value": "v"},
     2, 400, "invalid_request"),
])
def test_same_mistakes_same_errors(cli: Cli, daemon_factory: Any, cli_args: tuple[str, ...],
                                   method: str, path: str, body: Any, exit_code: int,
                                   status: int, error: str) -> None:
    """The CLI's exit code and the admin API's status and code agree for each mistake."""
    cli.add("@k", "v")
    d = daemon_factory()
    assert cli(*cli_args, input="v").returncode == exit_code
    with pytest.raises(BrokerError) as exc:
        d.client().request(method, path, body)
    assert (exc.value.status, exc.value.code) == (status, error)
    assert exc.value.exit_code == exit_code


def test_grants_explain_cli(cli: Cli) -> None:
    """`grants explain` is the CLI twin of the explain route: exit 0 allow, 4 deny."""
    write_grants(cli.home, grant("k", "a", purposes='"llm.chat"', delivery='"native"',
                                 hosts='"x.io"', ttl=60))
    out = cli.ok("grants", "explain", "--consumer", "a", "--secret", "@k", "--purpose",
                 "llm.chat", "--delivery", "native", "--json")
    assert json.loads(out)["grant"] == {"index": 0, "line": 1}
    denied = cli("grants", "explain", "--consumer", "b", "--secret", "@k", "--purpose",
                 "llm.chat", "--delivery", "native")
    assert denied.returncode == 4 and "deny" in denied.stdout


def test_token_list_and_revoke_by_consumer(cli: Cli) -> None:
    """`token list` never shows a value; `revoke --consumer` ends all of its tokens."""
    first = create_token(cli, "svc")
    create_token(cli, "svc", "--description", "second")
    listed = cli.ok("token", "list")
    assert "svc" in listed and first["token"] not in listed
    assert "revoked 2 token(s)" in cli.ok("token", "revoke", "--consumer", "svc")
    assert cli("token", "revoke", "tok_nope").returncode == 3
    events = json.loads(cli.ok("audit", "--event", "token.", "--json"))["events"]
    assert [e["event"] for e in events] == ["token.created"] * 2 + ["token.revoked"] * 2
    assert not scan(json.dumps(events), first["token"])
