"""The provider table: one entry per upstream API family, the only place that knows routes.

Each entry says where the upstream is, how the real key is sent, where a caller may put
its broker token, which routes exist (and for what purpose), and how errors look, so
that an SDK raises its usual exception for the broker's own errors. `config.toml`
`[providers.NAME]` tables override `base_url` and `secret_ref`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from broker.config import ProviderSettings
from broker.errors import ConfigError


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # relative, may hold `{name}` segments, e.g. "v1beta/models/{model}:generateContent"
    purpose: str


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    secret_ref: str | None
    auth_header: str  # how the real key is sent upstream
    auth_format: str  # "{key}" or "Bearer {key}"
    caller_auth: tuple[str, ...]  # headers where a caller may present its broker token
    error_shape: str  # openai | google | detail
    routes: tuple[Route, ...]

    @property
    def host(self) -> str:
        """What a grant's `allowed_hosts` must name: host, or host:port when the URL has one."""
        parts = urlsplit(self.base_url)
        host = (parts.hostname or "").lower()
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{parts.port}" if parts.port else host

    def upstream_url(self, path: str, query: str) -> str:
        url = self.base_url.rstrip("/") + "/" + path
        return f"{url}?{query}" if query else url


_OPENAI_ROUTES = (
    Route("POST", "v1/chat/completions", "llm.chat"),
    Route("POST", "v1/responses", "llm.chat"),
    Route("POST", "v1/embeddings", "llm.embeddings"),
)
_GOOGLE_ROUTES = tuple(
    Route("POST", f"{version}/models/{{model}}:{method}", "llm.chat")
    for version in ("v1beta", "v1")
    for method in ("generateContent", "streamGenerateContent")
)
_EMBED_RERANK = (
    Route("POST", "v1/embeddings", "llm.embeddings"),
    Route("POST", "v1/rerank", "llm.rerank"),
)
_BEARER = ("authorization",)

BUILTIN: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("openai", "https://api.openai.com", "openai_api_key", "Authorization",
                 "Bearer {key}", _BEARER, "openai", _OPENAI_ROUTES),
        Provider("google", "https://generativelanguage.googleapis.com", "google_api_key",
                 "x-goog-api-key", "{key}", ("authorization", "x-goog-api-key"), "google",
                 _GOOGLE_ROUTES),
        Provider("jina", "https://api.jina.ai", "jina_api_key", "Authorization", "Bearer {key}",
                 _BEARER, "detail", _EMBED_RERANK),
        Provider("voyage", "https://api.voyageai.com", "voyage_api_key", "Authorization",
                 "Bearer {key}", _BEARER, "detail", _EMBED_RERANK),
    )
}


def build_providers(settings: Mapping[str, ProviderSettings]) -> dict[str, Provider]:
    """The built-in table with config.toml overrides applied."""
    table = dict(BUILTIN)
    for name, override in settings.items():
        if name not in table:
            raise ConfigError(
                f"config.toml: [providers.{name}] is not a known provider "
                f"({', '.join(sorted(BUILTIN))})"
            )
        provider = table[name]
        if override.base_url is not None:
            parts = urlsplit(override.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
                raise ConfigError(
                    f"config.toml: [providers.{name}] base_url must be an http(s) URL "
                    "without a query"
                )
            provider = replace(provider, base_url=override.base_url)
        if override.secret_ref is not None:
            provider = replace(provider, secret_ref=override.secret_ref.lstrip("@"))
        table[name] = provider
    return table


# --- errors in each provider's own shape ----------------------------------------------------

_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}


def error_body(shape: str, status: int, code: str, message: str) -> bytes:
    """The broker's own error, shaped so the provider's SDK parses it."""
    doc: dict[str, Any]
    if shape == "google":
        doc = {"error": {"code": status, "message": message,
                         "status": _GOOGLE_STATUS.get(status, "INTERNAL"), "reason": code}}
    elif shape == "detail":
        doc = {"detail": message, "code": code}
    else:  # openai, and the broker's own /v1 routes
        doc = {"error": {"message": message, "type": "broker_error", "code": code}}
    return json.dumps(doc).encode()


def usage_from_body(body: bytes) -> tuple[int | None, int | None]:
    """(input, output) tokens from a non-streamed JSON answer, where the provider gives them."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    usage = doc.get("usage") or doc.get("usageMetadata")
    if not isinstance(usage, dict):
        return None, None
    inp = usage.get("prompt_tokens", usage.get("input_tokens", usage.get("promptTokenCount")))
    out = usage.get("completion_tokens",
                    usage.get("output_tokens", usage.get("candidatesTokenCount")))
    if inp is None and out is None:
        inp = usage.get("total_tokens")
    return (inp if isinstance(inp, int) else None, out if isinstance(out, int) else None)
