"""broker.cli.mcp.Tools without a daemon: audit first, hints in errors, the token's sources."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from broker.cli.mcp import Tools, serve
from broker.core.errors import AuditUnavailable, BrokerError, Denied
from broker.gateway.scrub import REDACTED

TOKEN = "sbc_unit-test-token-0123456789abcdef"


class FakeDaemon:
    """Answers the routes the tools use; records which were asked."""

    def __init__(self, audit_fails: bool = False) -> None:
        self.audit_fails = audit_fails
        self.paths: list[str] = []

    def request(self, method: str, path: str, body: Any = None, headers: Any = None) -> Any:
        self.paths.append(path)
        if path == "/v1/mcp/tool-called":
            if self.audit_fails:
                raise AuditUnavailable("the audit log has no room; the request was refused")
            return {"consumer": "agent-a", "tool": body["tool"]}
        if path == "/v1/explain":
            raise Denied(f"no grant gives consumer 'agent-a' secret 'x' (token {TOKEN})")
        return {"usage": [{"consumer": "agent-a", "echo": TOKEN}]}


async def test_a_call_that_cannot_be_audited_is_not_made() -> None:
    """When recording mcp.tool_called fails, the tool fails and its work never starts."""
    daemon = FakeDaemon(audit_fails=True)
    with pytest.raises(ToolError, match="the call was not made: the audit log has no room"):
        await Tools(daemon, TOKEN).usage()  # type: ignore[arg-type]
    assert daemon.paths == ["/v1/mcp/tool-called"]


async def test_answers_and_errors_are_scrubbed_and_denials_name_the_grant() -> None:
    """The token never comes back; a denial tells the agent what the owner must grant."""
    daemon = FakeDaemon()
    tools = Tools(daemon, TOKEN)  # type: ignore[arg-type]
    assert await tools.usage() == {"usage": [{"consumer": "agent-a", "echo": REDACTED}]}
    with pytest.raises(ToolError) as exc:
        await tools.explain_access("x", "llm.chat")
    message = str(exc.value)
    assert TOKEN not in message and REDACTED in message
    assert "ask the owner to add a grant for consumer 'agent-a'" in message
    assert daemon.paths == ["/v1/mcp/tool-called", "/v1/usage",
                            "/v1/mcp/tool-called", "/v1/explain"]


def test_token_file_must_be_private(tmp_path: Path) -> None:
    """SECRET_BROKER_TOKEN_FILE readable by others refuses every tool, naming the chmod."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    env = {"SECRET_BROKER_TOKEN_FILE": str(path), "SECRET_BROKER_URL": "http://127.0.0.1:9"}
    refused = Tools.from_env(env)
    assert refused._client is None and f"chmod 600 {path}" in str(refused._refusal)
    path.chmod(0o600)
    assert Tools.from_env(env)._token == TOKEN


def test_without_the_sdk_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `mcp` package: a clear error naming `pip install 'secret-broker[mcp]'`."""
    monkeypatch.setitem(sys.modules, "mcp.server.mcpserver", None)  # makes the import fail
    with pytest.raises(BrokerError, match=r"pip install 'secret-broker\[mcp\]'"):
        serve({})
