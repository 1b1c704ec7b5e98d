"""broker.gateway.routes: a raw /proxy/ path to a provider route, or the documented refusal."""

from __future__ import annotations

import pytest

from broker.core.errors import MethodNotAllowed, RouteNotFound
from broker.gateway.providers import BUILTIN
from broker.gateway.routes import match, normalise, provider_name


def test_matches_a_plain_route_and_keeps_the_query() -> None:
    """A known route gives its provider, purpose, normalised path and the query as sent."""
    m = match(BUILTIN, "POST", "/proxy/openai/v1/chat/completions?a=1&b=%2F")
    assert (m.provider.name, m.route.purpose, m.path) == ("openai", "llm.chat",
                                                          "v1/chat/completions")
    assert m.query == "a=1&b=%2F" and m.params == {}


def test_named_segments_become_params() -> None:
    """`{model}` and `{deployment}` segments are returned by name."""
    m = match(BUILTIN, "POST", "/proxy/google/v1beta/models/gemini-2.0-flash:generateContent")
    assert m.params == {"model": "gemini-2.0-flash"}
    m = match(BUILTIN, "POST", "/proxy/azure-openai/openai/deployments/gpt4o/embeddings")
    assert (m.params, m.route.purpose) == ({"deployment": "gpt4o"}, "llm.embeddings")


def test_doubled_slashes_collapse_and_unreserved_escapes_decode() -> None:
    """`//` collapses and `%76` (an unreserved `v`) decodes before matching."""
    m = match(BUILTIN, "POST", "/proxy//openai//%761/embeddings/")
    assert (m.provider.name, m.path) == ("openai", "v1/embeddings")


@pytest.mark.parametrize("raw", [
    "/proxy/openai/v1/../v1/embeddings",
    "/proxy/openai/./v1/embeddings",
    "/proxy/openai/v1%2Fembeddings",
    "/proxy/openai/v1%5cembeddings",
    "/proxy/openai/v1\\embeddings",
    "/proxy/google/v1/models/a..b:generateContent",
    "/proxy/openai/v1/emb eddings",
])
def test_escaping_paths_are_refused(raw: str) -> None:
    """Dot segments, encoded separators, backslashes and odd characters never match."""
    with pytest.raises(RouteNotFound):
        match(BUILTIN, "POST", raw)


def test_unknown_provider_lists_the_known_ones() -> None:
    """An unknown provider names every known one, so the caller can fix the URL."""
    with pytest.raises(RouteNotFound, match="known: anthropic, azure-openai"):
        match(BUILTIN, "POST", "/proxy/nope/v1/embeddings")
    with pytest.raises(RouteNotFound, match="no route"):
        match(BUILTIN, "POST", "/v1/health")


def test_unknown_route_lists_the_provider_routes() -> None:
    """A path the provider does not serve lists what it serves."""
    with pytest.raises(RouteNotFound, match="POST v1/embeddings, POST v1/rerank"):
        match(BUILTIN, "POST", "/proxy/jina/v1/chat/completions")


def test_wrong_method_names_the_allowed_one() -> None:
    """A served path with another method is 405-shaped and names the method to use."""
    with pytest.raises(MethodNotAllowed, match="use POST"):
        match(BUILTIN, "GET", "/proxy/openai/v1/embeddings")


def test_normalise_and_provider_name() -> None:
    """normalise splits into clean segments; provider_name reads the first segment only."""
    assert normalise("a//b/c/") == ["a", "b", "c"]
    assert provider_name("/proxy/google/v1?x=1") == "google"
    assert provider_name("/proxy/?x") is None
    assert provider_name("/v1/health") is None
