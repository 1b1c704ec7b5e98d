"""`secret-broker mcp`: a stdio MCP server through which an agent uses keys it never sees.

Who the agent is comes from the consumer token the owner puts in this server's
environment (`SECRET_BROKER_TOKEN` or `SECRET_BROKER_TOKEN_FILE`), never from a tool
argument, so the model cannot choose who it is; without one every tool is refused (the
owner's `broker.token` is never a fallback). Each tool is one call to the daemon's consumer
routes (`/v1/grants`, `/v1/explain`, `/v1/usage`) or its gateway (`/proxy/…`), so grants,
leases, usage and audit apply exactly as for an SDK. Each call is recorded by the daemon
(`mcp.tool_called`) before it is made: no audit, no action. Every answer, and every error,
is scrubbed on its way to the model: the daemon, which holds the values, replaces each
stored value in a provider's answer (SCRUB_HEADER), and this server removes key shapes and
its own token.

The `mcp` SDK (the extra `secret-broker[mcp]`) is imported only where the server runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from broker import __version__
from broker.client import BrokerClient
from broker.config import load_config
from broker.core.errors import BrokerError
from broker.core.home import Home, secret_file_from
from broker.core.protocol import MAX_ANSWER_BYTES, SCRUB_HEADER
from broker.gateway import sse
from broker.gateway.scrub import scrub

CALL_TIMEOUT_SECS = 330.0  # longer than the daemon's own idle read timeout (300 s)
_PROVIDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A route path as the gateway matches it; the daemon normalises and checks it again.
_ROUTE_PATH = re.compile(r"[A-Za-z0-9._~:/?&=%@+,;!$*'()-]{1,2048}")
_GRANT_HINT = ("ask the owner to add a grant for consumer {consumer!r} to secrets.grants.toml "
               "(delivery http_header_inject for call_provider, with the provider's host in "
               "allowed_hosts); `secret-broker grants explain --consumer {consumer} ...` shows "
               "what is missing")
_REISSUE_HINT = ("the owner must create a new consumer token (`secret-broker token create "
               "--consumer NAME`) and set SECRET_BROKER_TOKEN for this MCP server")

INSTRUCTIONS = """\
Use API providers (OpenAI, Google, Jina, Voyage, ...) through the owner's secret-broker
without ever handling a key: call_provider sends your request through the broker, which
adds the key. list_secrets shows what you are granted; explain_access tells you why a
use would be allowed or denied; usage shows what you have spent. Access is granted by the
owner only; when a tool says a grant is missing, tell the owner which one."""

DESCRIPTIONS = {
    "list_secrets": "The secrets this agent has a grant for: ref, provider, kind, purposes, "
                    "deliveries and hosts. Never a value.",
    "explain_access": "Would this agent be allowed to use a secret for a purpose (e.g. "
                      "llm.chat, llm.embeddings, llm.rerank) through call_provider? Returns "
                      "{decision: allow|deny, reason, grant}.",
    "call_provider": "POST a JSON body to a provider's API route through the broker, which "
                     "adds the key. provider: openai, google, jina, voyage (or one the owner "
                     "configured); path: the route, e.g. v1/chat/completions, v1/embeddings, "
                     "v1/rerank, v1beta/models/MODEL:generateContent; body: the JSON request "
                     "object. Returns {status, streamed, answer}: the provider's JSON answer, "
                     "or for a streamed answer (SSE) the list of its events; answers over "
                     f"{MAX_ANSWER_BYTES // 1024} KiB are cut, with a note.",
    "usage": "This agent's usage through the broker: requests, errors and tokens per "
             "provider, model, route and day.",
}


# --- provider answers (pure) -----------------------------------------------------------------


def read_answer(content_type: str, raw: bytes) -> tuple[bool, Any]:
    """(streamed, answer): SSE as its events, JSON decoded, anything else as text."""
    if content_type.lower().startswith("text/event-stream"):
        return True, sse.events(raw)
    text = raw.decode("utf-8", "replace")
    try:
        return False, json.loads(text)
    except ValueError:
        return False, text


def error_parts(answer: Any) -> tuple[str | None, str]:
    """(code, message) of an error answer in any shape the broker or a provider uses:
    OpenAI and Anthropic `{"error": {"code", "message"}}`, Google `{"error": {"message",
    "reason"}}`, Jina and Voyage `{"detail", "code"}`."""
    if isinstance(answer, dict):
        inner = answer.get("error")
        err = inner if isinstance(inner, dict) else answer
        code = err.get("reason", err.get("code"))
        message = err.get("message", err.get("detail"))
        if isinstance(message, str):
            return (code if isinstance(code, str) else None), message
    return None, (answer if isinstance(answer, str) else json.dumps(answer))[:2000]


# --- the tools -------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    from mcp.server.mcpserver.exceptions import ToolError

    raise ToolError(message)


class Tools:
    """The four tools over one daemon connection, as one consumer."""

    def __init__(self, client: BrokerClient | None, token: str | None,
                 refusal: str | None = None) -> None:
        self._client = client
        self._token = token
        self._refusal = refusal  # why every tool is refused, or None
        self._consumer = "this consumer"  # learned from the first audited call

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Tools:
        """The token from SECRET_BROKER_TOKEN or _FILE; the daemon from SECRET_BROKER_URL,
        else the home's Unix socket, else its `[broker] listen` (owner-checked). A problem
        refuses every tool, naming the fix."""
        try:
            token = _token_from(environ)
            if token is None or not token.startswith("sbc_"):
                kind = ("no consumer token is set" if token is None
                        else "the token it was given is not a consumer token (sbc_...)")
                return cls(None, None, (
                    f"every tool is refused: {kind}. The owner must set SECRET_BROKER_TOKEN "
                    "(or SECRET_BROKER_TOKEN_FILE) in this MCP server's environment to a "
                    "consumer token made with `secret-broker token create --consumer NAME`; "
                    "the owner's bootstrap token is never used here."))
            client = _client(environ, token)
        except BrokerError as exc:
            return cls(None, None, "every tool is refused until the owner fixes this MCP "
                                   f"server's environment: {exc.message}")
        return cls(client, token)

    async def list_secrets(self) -> dict[str, Any]:
        return await self._run("list_secrets", self._list_secrets)

    async def explain_access(self, secret_ref: str, purpose: str) -> dict[str, Any]:
        return await self._run("explain_access", lambda c: dict(c.request(
            "POST", "/v1/explain", {"secret_ref": secret_ref, "purpose": purpose})))

    async def call_provider(self, provider: str, path: str,
                            body: dict[str, Any]) -> dict[str, Any]:
        return await self._run("call_provider",
                               lambda c: self._call_provider(c, provider, path, body))

    async def usage(self) -> dict[str, Any]:
        return await self._run("usage", lambda c: dict(c.request("GET", "/v1/usage")))

    async def _run(self, tool: str,
                   work: Callable[[BrokerClient], dict[str, Any]]) -> dict[str, Any]:
        """Refuse without a consumer token; record the call (no audit, no action); do the
        work off the event loop; scrub whatever goes back, errors included."""
        if self._client is None:
            _fail(self._refusal or "every tool is refused")
        client = self._client
        try:
            recorded = await asyncio.to_thread(client.request, "POST", "/v1/mcp/tool-called",
                                               {"tool": tool})
        except BrokerError as exc:
            # Calls are recorded before they are made; unrecorded, nothing is done.
            self._fail_scrubbed(f"the call was not made: {exc.message}", exc.code)
        self._consumer = str(recorded.get("consumer") or self._consumer)
        try:
            result = await asyncio.to_thread(work, client)
        except BrokerError as exc:
            self._fail_scrubbed(exc.message, exc.code)
        return dict(scrub(result, [self._token or ""]))

    def _fail_scrubbed(self, message: str, code: str) -> NoReturn:
        if code in ("grant_denied", "host_not_allowed"):
            message += "; " + _GRANT_HINT.format(consumer=self._consumer)
        elif code == "unauthorized":
            message += "; " + _REISSUE_HINT
        _fail(scrub(message, [self._token or ""]))

    def _list_secrets(self, client: BrokerClient) -> dict[str, Any]:
        doc = client.request("GET", "/v1/grants")
        secrets: dict[str, dict[str, Any]] = {}
        for grant in doc["grants"]:
            entry = secrets.setdefault(grant["secret_ref"], {
                "ref": grant["secret_ref"], "provider": grant["provider"],
                "kind": grant["kind"], "stored": grant["exists"],
                "purposes": [], "deliveries": [], "hosts": []})
            for key, field in (("purposes", "purposes"), ("deliveries", "delivery"),
                               ("hosts", "allowed_hosts")):
                entry[key] += [v for v in grant[field] if v not in entry[key]]
        return {"consumer": doc["consumer"], "secrets": list(secrets.values())}

    @staticmethod
    def _call_provider(client: BrokerClient, provider: str, path: str,
                       body: dict[str, Any]) -> dict[str, Any]:
        path = path.lstrip("/")
        if not _PROVIDER.fullmatch(provider):
            raise BrokerError(f"unknown provider {provider[:64]!r}: use a name such as openai, "
                              "google, jina or voyage", code="invalid_request")
        if not _ROUTE_PATH.fullmatch(path):
            raise BrokerError("path must be a provider route such as v1/chat/completions "
                              "(URL characters only, no spaces)", code="invalid_request")
        status, headers, raw = client.exchange(
            "POST", f"/proxy/{provider}/{path}", json.dumps(body).encode(),
            {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
             SCRUB_HEADER: "values"},
            limit=MAX_ANSWER_BYTES + 1)
        cut = len(raw) > MAX_ANSWER_BYTES
        streamed, answer = read_answer(headers.get("content-type", ""), raw[:MAX_ANSWER_BYTES])
        if not 200 <= status < 300:
            code, message = error_parts(answer)
            raise BrokerError(f"{provider} answered HTTP {status}"
                              + (f" ({code})" if code else "") + f": {message}",
                              code=code or "upstream_error")
        doc: dict[str, Any] = {"status": status, "streamed": streamed, "answer": answer}
        if cut:
            doc["note"] = (f"the answer was longer than {MAX_ANSWER_BYTES} bytes and was cut "
                           "there; ask for less (e.g. max_tokens, fewer inputs)")
        return doc


def _client(environ: Mapping[str, str], token: str) -> BrokerClient:
    """SECRET_BROKER_URL; else the home's Unix socket where this user may enter the home (no
    other user can listen there); else the home's `listen`, which the client checks."""
    url = environ.get("SECRET_BROKER_URL")
    if url:
        return BrokerClient(url=url, token=token, timeout=CALL_TIMEOUT_SECS)
    home = Home.from_env(dict(environ))
    if os.access(home.root, os.R_OK | os.X_OK):
        return BrokerClient(socket_path=home.socket, token=token, timeout=CALL_TIMEOUT_SECS)
    return BrokerClient(url="http://" + load_config(home).listen, token=token,
                        timeout=CALL_TIMEOUT_SECS)


def _token_from(environ: Mapping[str, str]) -> str | None:
    token = environ.get("SECRET_BROKER_TOKEN")
    if token:
        return token
    path = secret_file_from(environ, "SECRET_BROKER_TOKEN_FILE")
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerError(f"cannot read SECRET_BROKER_TOKEN_FILE {path}: "
                          f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None


def serve(environ: Mapping[str, str]) -> int:
    """Run the stdio server until the host closes it."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.types import ToolAnnotations
    except ImportError:
        raise BrokerError("`secret-broker mcp` needs the MCP SDK: "
                          "pip install 'secret-broker[mcp]'") from None
    tools = Tools.from_env(environ)
    server: MCPServer[Any] = MCPServer("secret-broker", version=__version__,
                                       instructions=INSTRUCTIONS)
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    calls_out = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                idempotent_hint=False, open_world_hint=True)
    for name, fn, hints in (("list_secrets", tools.list_secrets, read_only),
                            ("explain_access", tools.explain_access, read_only),
                            ("call_provider", tools.call_provider, calls_out),
                            ("usage", tools.usage, read_only)):
        server.add_tool(fn, name=name, description=DESCRIPTIONS[name], annotations=hints)
    server.run("stdio")
    return 0
