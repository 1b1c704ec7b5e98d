"""Names shared by the daemon and its clients (the MCP server): one place, both import it."""

from __future__ import annotations

# The MCP server's tools; the daemon records each call (`POST /v1/mcp/tool-called`).
TOOLS = ("list_secrets", "explain_access", "call_provider", "usage")
MAX_ANSWER_BYTES = 256 * 1024  # what a model's context can take; the rest is cut with a note
# Asks the daemon, which holds the values, to return a /proxy answer whole with every stored
# value (exact and base64) replaced by "[redacted]", whatever the values look like.
SCRUB_HEADER = "X-Broker-Scrub"
