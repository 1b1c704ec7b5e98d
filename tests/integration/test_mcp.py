"""`secret-broker mcp` as a subprocess, driven by the mcp SDK's own stdio client (SPEC §14)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from broker.core.errors import UsageError
from tests.conftest import CANARY, Cli, grant, scan, wait_for, write_grants
from tests.support.gateway import PROVIDERS, Broker, configure, real_key
from tests.support.mcp import agent
from tests.support.standins import StandIn

TOOLS = {"list_secrets", "explain_access", "call_provider", "usage"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def create_token(cli: Cli, consumer: str) -> str:
    return str(json.loads(cli.ok("token", "create", "--consumer", consumer, "--json"))["token"])


def grant_openai_to(gateway: Broker, consumer: str) -> None:
    """`consumer` may use openai; `other` may use jina; nobody else anything."""
    hosts = {p: gateway.standins[p].host for p in ("openai", "jina")}
    write_grants(gateway.cli.home, "".join(
        grant(f"{p}_api_key", who, delivery='"http_header_inject"', hosts=f'"{hosts[p]}"')
        for p, who in (("openai", consumer), ("jina", "other"))))
    client = gateway.daemon.client(unix=True)
    wait_for(lambda: client.status()["grants"]["count"] == 2, timeout=10, what="grants reload")


def never_seen(gateway: Broker, token: str) -> list[str]:
    """Every stored value, the bootstrap token, and the consumer token in the forms scrubbed."""
    raw = token.encode()
    return [*(real_key(p) for p in PROVIDERS), gateway.daemon.token, token,
            base64.b64encode(raw).decode().rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("=")]


@pytest.mark.parametrize("token", ["none", "bootstrap"])
async def test_without_a_consumer_token_every_tool_is_refused(cli: Cli, token: str) -> None:
    """Tools are listed with their annotations; each call is refused, naming the fix."""
    env = dict(cli.env)
    bootstrap = (cli.home / "broker.token").read_text().strip()
    if token == "bootstrap":
        env["SECRET_BROKER_TOKEN"] = bootstrap
    async with agent(env, cli.home) as a:
        listed = {t.name: t for t in (await a.session.list_tools()).tools}
        assert set(listed) == TOOLS
        for name, tool in listed.items():
            assert tool.description and tool.annotations is not None
            assert tool.annotations.read_only_hint is (name != "call_provider")
            assert tool.annotations.open_world_hint is (name == "call_provider")
        assert set(listed["call_provider"].input_schema["required"]) == {"provider", "path", "body"}
        for name, args in (("list_secrets", {}), ("usage", {}),
                           ("explain_access", {"secret_ref": "openai_api_key",
                                               "purpose": "llm.chat"}),
                           ("call_provider", {"provider": "openai", "path": "v1/embeddings",
                                              "body": {"input": "x"}})):
            message = await a.error(name, **args)
            assert "every tool is refused" in message
            assert "SECRET_BROKER_TOKEN" in message and "token create --consumer" in message
        assert scan(a.everything(), bootstrap) == []


async def test_an_agent_uses_its_grants_through_the_gateway(gateway: Broker,
                                                            standins: dict[str, StandIn]) -> None:
    """Found via config.toml's listen: list, explain, call (plain and streamed), usage, audit."""
    configure(gateway.cli, standins,
              extra=f'[broker]\nlisten = "127.0.0.1:{gateway.daemon.port}"\n')
    grant_openai_to(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-a")
    openai = standins["openai"]
    async with agent({**gateway.cli.env, "SECRET_BROKER_TOKEN": token}, gateway.cli.home) as a:
        listed = await a.ok("list_secrets")
        assert listed == {"consumer": "agent-a", "secrets": [{
            "ref": "openai_api_key", "provider": "openai", "kind": "api_key", "stored": True,
            "purposes": ["llm.chat", "llm.embeddings"], "deliveries": ["http_header_inject"],
            "hosts": [openai.host]}]}

        allowed = await a.ok("explain_access", secret_ref="openai_api_key", purpose="llm.chat")
        assert allowed["decision"] == "allow" and allowed["grant"]["index"] == 0
        denied = await a.ok("explain_access", secret_ref="jina_api_key", purpose="llm.chat")
        assert denied["decision"] == "deny" and "agent-a" in denied["reason"]

        chat = await a.ok("call_provider", provider="openai", path="v1/chat/completions",
                          body=CHAT)
        assert chat["status"] == 200 and chat["streamed"] is False
        assert chat["answer"]["choices"][0]["message"]["content"] == openai.expected_text
        emb = await a.ok("call_provider", provider="openai", path="/v1/embeddings",
                         body={"model": "m", "input": ["a"]})
        assert emb["answer"]["data"][0]["embedding"] == StandIn.embedding(0)
        stream = await a.ok("call_provider", provider="openai", path="v1/chat/completions",
                            body={**CHAT, "stream": True})
        assert stream["streamed"] is True
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in stream["answer"]
                       if e["choices"]) == openai.expected_text

        refused = await a.error("call_provider", provider="jina", path="v1/embeddings",
                                body={"model": "jina-embeddings-v3", "input": ["a"]})
        assert "HTTP 403 (grant_denied)" in refused and "no grant gives consumer" in refused
        assert "ask the owner to add a grant for consumer 'agent-a'" in refused
        assert standins["jina"].requests == []

        rows = (await a.ok("usage"))["usage"]
        assert {r["consumer"] for r in rows} == {"agent-a"}
        assert sum(r["requests"] for r in rows if r["provider"] == "openai") == 3

    gateway.assert_only_real_key_upstream("openai", token)
    called = ["list_secrets", "explain_access", "explain_access", "call_provider",
              "call_provider", "call_provider", "call_provider", "usage"]

    def recorded() -> list[dict[str, Any]] | None:
        events = gateway.audit("mcp.tool_called")
        return events if len(events) >= len(called) else None

    events = wait_for(recorded, what="the mcp.tool_called events")
    assert [e["tool"] for e in events] == called
    assert {(e["consumer"], e["outcome"], e["actor"]) for e in events} == {
        ("agent-a", "called", "broker")}
    assert scan([*a.everything(), gateway.daemon.log()], *never_seen(gateway, token)) == []


async def test_answers_are_scrubbed_and_capped(gateway: Broker,
                                               standins: dict[str, StandIn]) -> None:
    """An upstream echoing key shapes and the token is scrubbed; a huge answer is cut."""
    grant_openai_to(gateway, "agent-a")
    token = create_token(gateway.cli, "agent-a")
    openai = standins["openai"]
    env = {**gateway.cli.env, "SECRET_BROKER_TOKEN": token,
           "SECRET_BROKER_URL": gateway.daemon.url}
    leaky = {"echo": [CANARY, token, base64.b64encode(token.encode()).decode()],
             token: "as a key", "ok": "kept"}
    async with agent(env, gateway.cli.home) as a:
        openai.force = (200, json.dumps(leaky).encode(), {"Content-Type": "application/json"})
        answer = (await a.ok("call_provider", provider="openai", path="v1/embeddings",
                             body={"input": "x"}))["answer"]
        assert answer == {"echo": ["[redacted]"] * 3, "[redacted]": "as a key", "ok": "kept"}

        openai.force = (200, b"x" * (300 * 1024), {"Content-Type": "text/plain"})
        big = await a.ok("call_provider", provider="openai", path="v1/embeddings",
                         body={"input": "x"})
        assert len(big["answer"]) == 256 * 1024 and "was cut" in big["note"]

        bad_path = await a.error("call_provider", provider="openai", path="v1/a b", body={})
        assert "path must be a provider route" in bad_path
    assert scan(a.everything(), CANARY, *never_seen(gateway, token)) == []
    with pytest.raises(UsageError, match="naming one of"):
        gateway.daemon.client(token).request("POST", "/v1/mcp/tool-called", {"tool": "rm"})
