"""Raw request path -> a provider route, or an error. Pure: no sockets, no aiohttp.

aiohttp decodes `%2F` in its match_info, so we match the raw path ourselves: decode only
unreserved characters, refuse encoded separators, drop `.`/`..` segments by refusing
them, collapse doubled slashes, and match the result against the provider's route table.
The upstream path is rebuilt from the normalised segments, never from the raw text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from broker.core.errors import MethodNotAllowed, RouteNotFound
from broker.gateway.providers import Provider, Route

PREFIX = "/proxy/"
_SEGMENT = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=-]+")
_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|5[fF]|7[eE]|[346][0-9a-fA-F]|[57][0-9aA])")


@dataclass(frozen=True)
class Match:
    provider: Provider
    route: Route
    path: str  # normalised route path, e.g. "v1/chat/completions"
    query: str  # the raw query string, kept as sent
    params: dict[str, str]  # `{name}` segments, e.g. {"model": "gemini-2.0-flash"}

    @property
    def usage_format(self) -> str:
        """How the usage tap reads the answer: the route's own format, else the provider's."""
        return self.route.usage or self.provider.usage

    def upstream_url(self, query: str) -> str:
        """The upstream URL, built from the normalised path (never the raw one)."""
        url = (self.provider.base_url or "").rstrip("/") + "/" + self.path
        return f"{url}?{query}" if query else url


def provider_name(raw_path: str) -> str | None:
    """The provider segment of a /proxy/ path, for shaping errors before matching."""
    if not raw_path.startswith(PREFIX):
        return None
    return raw_path[len(PREFIX):].split("/", 1)[0].split("?", 1)[0] or None


def normalise(raw: str) -> list[str]:
    """Segments of a raw path, or RouteNotFound for anything that could escape a route."""
    def decode(m: re.Match[str]) -> str:
        return chr(int(m.group(1), 16))

    text = _UNRESERVED_ESCAPE.sub(decode, raw)
    if "%" in text or "\\" in text:
        raise RouteNotFound("encoded separators and escapes are not allowed in proxy paths")
    segments = [s for s in text.split("/") if s]
    for segment in segments:
        # ".." anywhere (not only as a whole segment): no route or model name needs it,
        # and an upstream that normalises loosely must never see one.
        if segment == "." or ".." in segment or not _SEGMENT.fullmatch(segment):
            raise RouteNotFound("the proxy path holds a dot segment or a character not allowed")
    return segments


@lru_cache(maxsize=256)
def _pattern(path: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", path):
        out.append(re.escape(path[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>[A-Za-z0-9._~-]+)")
        pos = m.end()
    out.append(re.escape(path[pos:]))
    return re.compile("".join(out))


def match(providers: Mapping[str, Provider], method: str, raw_path: str) -> Match:
    """Match `/proxy/{provider}/{path}?{query}` (the request's raw path)."""
    path, _, query = raw_path.partition("?")
    if not path.startswith(PREFIX):
        raise RouteNotFound(f"no route {path}")
    segments = normalise(path[len(PREFIX):])
    if not segments or segments[0] not in providers:
        known = ", ".join(sorted(providers))
        raise RouteNotFound(f"unknown provider in {path}; known: {known}")
    provider = providers[segments[0]]
    rest = "/".join(segments[1:])
    allowed: list[str] = []
    for route in provider.routes:
        found = _pattern(route.path).fullmatch(rest)
        if found is None:
            continue
        if route.method == method:
            return Match(provider, route, rest, query, found.groupdict())
        allowed.append(route.method)
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed on /proxy/{provider.name}/{rest}; "
                               f"use {', '.join(sorted(set(allowed)))}")
    raise RouteNotFound(f"no {provider.name} route /{rest}; the gateway serves: "
                        + ", ".join(f"{r.method} {r.path}" for r in provider.routes))
