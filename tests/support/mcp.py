"""An agent's MCP session with `secret-broker mcp`, through the `mcp` SDK's own client."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult


class Agent:
    """One MCP session; every tool answer (and the server's stderr) is kept for scans."""

    def __init__(self, session: ClientSession, errlog: Path) -> None:
        self.session = session
        self.errlog = errlog
        self.outputs: list[str] = []

    async def call(self, tool: str, **arguments: Any) -> CallToolResult:
        result = await self.session.call_tool(tool, arguments)
        self.outputs.append(result.model_dump_json())
        return result

    async def ok(self, tool: str, **arguments: Any) -> Any:
        result = await self.call(tool, **arguments)
        assert not result.is_error, result.content
        return result.structured_content

    async def error(self, tool: str, **arguments: Any) -> str:
        result = await self.call(tool, **arguments)
        assert result.is_error
        return "".join(getattr(c, "text", "") for c in result.content)

    def everything(self) -> list[str]:
        return [*self.outputs, self.errlog.read_text(errors="replace")]


@asynccontextmanager
async def agent(env: dict[str, str], home: Path) -> AsyncIterator[Agent]:
    errlog = home.parent / "mcp-stderr.log"
    params = StdioServerParameters(command=sys.executable, args=["-m", "broker", "mcp"], env=env)
    with errlog.open("w") as err:
        async with stdio_client(params, errlog=err) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield Agent(session, errlog)
