"""The provider table: one entry per upstream API family, the only place that knows routes.

Each entry says where the upstream is, how the real key is sent, where a caller may put
its broker token, which routes exist (and for what purpose), how errors look (so an SDK
raises its usual exception for the broker's own errors) and where usage is reported.
Built-in entries and `[providers.NAME]` tables of config.toml go through the same code:
a table may override keys of a built-in, or declare a provider the broker does not know
(with only `base_url` and `secret_ref`, an OpenAI-compatible server).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from broker.core.errors import ConfigError
from broker.core.refs import AT_REF_RE, PROVIDER_RE

ERROR_SHAPES = ("openai", "google", "anthropic", "detail")
USAGE_FORMATS = ("openai", "openai-responses", "gemini", "anthropic", "total_tokens", "none")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_ROUTE_SEGMENT = re.compile(r"[A-Za-z0-9._~:-]*(\{\w+\}[A-Za-z0-9._~:-]*)*")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # relative, may hold `{name}` segments, e.g. "v1beta/models/{model}:generateContent"
    purpose: str
    query: tuple[tuple[str, str], ...] = ()  # added to the upstream URL when absent
    usage: str | None = None  # overrides the provider's usage format for this route


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str | None  # None: must be configured (a per-tenant endpoint, e.g. Azure)
    secret_ref: str | None  # None: the one secret whose provider is this one
    auth_header: str  # how the real key is sent upstream
    auth_format: str  # "{key}" or "Bearer {key}"
    caller_auth: tuple[str, ...]  # headers where a caller may present its broker token
    error_shape: str
    usage: str
    routes: tuple[Route, ...]
    add_headers: tuple[tuple[str, str], ...] = field(default=())  # only when the caller sent none

    @cached_property  # frozen, so computed once: it is asked on every proxied request
    def host(self) -> str:
        """What a grant's `allowed_hosts` must name: host, or host:port when the URL has one."""
        parts = urlsplit(self.base_url or "")
        host = (parts.hostname or "").lower()
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{parts.port}" if parts.port else host


def _routes(*specs: tuple[str, str, str]) -> tuple[Route, ...]:
    return tuple(Route(method, path, purpose) for method, path, purpose in specs)


_OPENAI_COMPATIBLE = (
    Route("POST", "v1/chat/completions", "llm.chat"),
    Route("POST", "v1/responses", "llm.chat", usage="openai-responses"),
    Route("POST", "v1/embeddings", "llm.embeddings"),
)
_GOOGLE = tuple(
    Route("POST", f"{version}/models/{{model}}:{method}", "llm.chat")
    for version in ("v1beta", "v1")
    for method in ("generateContent", "streamGenerateContent")
)
_EMBED_RERANK = _routes(("POST", "v1/embeddings", "llm.embeddings"),
                        ("POST", "v1/rerank", "llm.rerank"))
_AZURE_QUERY = (("api-version", "2024-10-21"),)
_AZURE = tuple(
    Route("POST", f"openai/deployments/{{deployment}}/{path}", purpose, _AZURE_QUERY)
    for path, purpose in (("chat/completions", "llm.chat"), ("completions", "llm.chat"),
                          ("embeddings", "llm.embeddings"))
)
_BEARER = ("authorization",)


def _openai_like(name: str, base_url: str | None, routes: tuple[Route, ...] = _OPENAI_COMPATIBLE,
                 **changes: Any) -> Provider:
    base = Provider(name, base_url, None, "Authorization", "Bearer {key}", _BEARER, "openai",
                    "openai", routes)
    return replace(base, **changes)


BUILTIN: dict[str, Provider] = {
    p.name: p
    for p in (
        _openai_like("openai", "https://api.openai.com"),
        Provider("google", "https://generativelanguage.googleapis.com", None, "x-goog-api-key",
                 "{key}", ("authorization", "x-goog-api-key"), "google", "gemini", _GOOGLE),
        _openai_like("jina", "https://api.jina.ai", _EMBED_RERANK, error_shape="detail",
                     usage="total_tokens"),
        _openai_like("voyage", "https://api.voyageai.com", _EMBED_RERANK, error_shape="detail",
                     usage="total_tokens"),
        Provider("anthropic", "https://api.anthropic.com", None, "x-api-key", "{key}",
                 ("authorization", "x-api-key"), "anthropic", "anthropic",
                 (Route("POST", "v1/messages", "llm.chat"),
                  Route("POST", "v1/messages/count_tokens", "llm.chat", usage="none")),
                 (("anthropic-version", "2023-06-01"),)),
        _openai_like("openrouter", "https://openrouter.ai/api"),
        _openai_like("azure-openai", None, _AZURE, auth_header="api-key", auth_format="{key}",
                     caller_auth=("authorization", "api-key")),
    )
}


# --- config.toml tables -----------------------------------------------------------------------


class _Table:
    """Reads one `[providers.NAME]` table strictly; every error names the key."""

    def __init__(self, name: str, body: Mapping[str, Any]) -> None:
        self.where = f"config.toml: [providers.{name}]"
        self.body = body

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where} {key}: {message}")

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n\x00"):
            raise self.fail(key, "must be a non-empty single-line string")
        return value

    def header(self, key: str, value: Any) -> str:
        if not _HEADER_NAME.fullmatch(self.text(key, value)):
            raise self.fail(key, "is not a valid HTTP header name")
        return str(value)

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}")
        return str(value)

    def string_table(self, key: str, value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table of strings")
        return tuple((self.text(f"{key}.{k}", k), self.text(f"{key}.{k}", v))
                     for k, v in value.items())

    def route(self, index: int, value: Any) -> Route:
        key = f"routes[{index}]"
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table {method, path, purpose}")
        unknown = set(value) - {"method", "path", "purpose", "query", "usage"}
        if unknown:
            raise self.fail(f"{key}.{sorted(unknown)[0]}", "unknown key")
        for required in ("method", "path", "purpose"):
            if required not in value:
                raise self.fail(f"{key}.{required}", "is required")
        path = self.text(f"{key}.path", value["path"]).strip("/")
        if not all(s and _ROUTE_SEGMENT.fullmatch(s) and s not in (".", "..")
                   for s in path.split("/")):
            raise self.fail(f"{key}.path", "is not a plain relative path (segments of "
                                           "A-Z a-z 0-9 . _ ~ : - and {name})")
        return Route(self.choice(f"{key}.method", value["method"], METHODS), path,
                     self.text(f"{key}.purpose", value["purpose"]),
                     self.string_table(f"{key}.query", value.get("query", {})),
                     None if "usage" not in value
                     else self.choice(f"{key}.usage", value["usage"], USAGE_FORMATS))

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.body.items():
            if key == "base_url":
                parts = urlsplit(self.text(key, value))
                if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
                    raise self.fail(key, "must be an http(s) URL without a query")
                out["base_url"] = value
            elif key == "secret_ref":
                if not isinstance(value, str) or not AT_REF_RE.fullmatch(value):
                    raise self.fail(key, "must be a secret ref like \"openai_api_key\"")
                out["secret_ref"] = value.lstrip("@")
            elif key == "auth":
                if not isinstance(value, dict) or set(value) != {"header", "format"}:
                    raise self.fail(key, "must be { header = \"…\", format = \"…{key}…\" }")
                fmt = self.text("auth.format", value["format"])
                if fmt.count("{key}") != 1 or fmt.replace("{key}", "").count("{"):
                    raise self.fail("auth.format", "must hold {key} exactly once")
                out["auth_header"] = self.header("auth.header", value["header"])
                out["auth_format"] = fmt
            elif key == "caller_auth":
                if not isinstance(value, list) or not value:
                    raise self.fail(key, "must be a non-empty list of header names")
                out["caller_auth"] = tuple(self.header(key, v).lower() for v in value)
            elif key == "add_headers":
                out["add_headers"] = tuple((self.header(f"{key}.{k}", k), v)
                                           for k, v in self.string_table(key, value))
            elif key == "error_shape":
                out["error_shape"] = self.choice(key, value, ERROR_SHAPES)
            elif key == "usage":
                out["usage"] = self.choice(key, value, USAGE_FORMATS)
            elif key == "routes":
                if not isinstance(value, list) or not value:
                    raise self.fail(key, "must be a non-empty list of route tables")
                out["routes"] = tuple(self.route(i, r) for i, r in enumerate(value))
            else:
                raise self.fail(key, "unknown key")
        return out


def build_providers(tables: Mapping[str, Any]) -> dict[str, Provider]:
    """The built-in table with config.toml's `[providers.*]` applied, strictly validated."""
    table = dict(BUILTIN)
    for name, body in tables.items():
        if not PROVIDER_RE.fullmatch(name):
            raise ConfigError(f"config.toml: [providers.{name}]: use a lower-case name")
        if not isinstance(body, dict):
            raise ConfigError(f"config.toml: [providers.{name}] must be a table")
        changes = _Table(name, body).changes()
        if name in table:
            table[name] = replace(table[name], **changes)
        elif "base_url" not in changes:
            raise ConfigError(f"config.toml: [providers.{name}] base_url: is required for a "
                              "provider the broker does not know")
        else:
            table[name] = replace(_openai_like(name, None), **changes)
    return table


# --- errors in each provider's own shape ----------------------------------------------------

_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 405: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error"}


def error_body(shape: str, status: int, code: str, message: str) -> bytes:
    """The broker's own error, shaped so the provider's SDK parses it."""
    doc: dict[str, Any]
    if shape == "google":
        doc = {"error": {"code": status, "message": message,
                         "status": _GOOGLE_STATUS.get(status, "INTERNAL"), "reason": code}}
    elif shape == "anthropic":
        doc = {"type": "error", "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"),
                                          "message": message, "code": code}}
    elif shape == "detail":
        doc = {"detail": message, "code": code}
    else:  # openai, and the broker's own /v1 routes
        doc = {"error": {"message": message, "type": "broker_error", "code": code}}
    return json.dumps(doc).encode()
