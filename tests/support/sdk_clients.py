"""The providers' real SDKs, pointed at any root URL: the broker or a stand-in.

Every factory takes the provider ROOT: what the provider's `base_url` is in SPEC §7, i.e.
`StandIn.base_url` for a stand-in, or `http://127.0.0.1:PORT/proxy/<provider>` for the
broker. Each SDK wants a different base URL; `sdk_base_url()` derives it:

| provider     | SDK base URL         | SDK then requests                                          |
|--------------|----------------------|------------------------------------------------------------|
| openai       | ROOT + "/v1"         | base + "/chat/completions", "/responses", "/embeddings"    |
| google       | ROOT                 | ROOT + "/{api_version}/models/{model}:generateContent" etc.|
| voyage       | ROOT + "/v1"         | base + "/embeddings", "/rerank"                            |
| jina         | ROOT (no SDK)        | ROOT + "/" + path, path like "v1/embeddings"               |
| anthropic    | ROOT                 | ROOT + "/v1/messages"                                      |
| azure-openai | ROOT (azure_endpoint)| ROOT + "/openai/deployments/{model}/chat/completions" and  |
|              |                      | ".../embeddings", each with "?api-version=..."             |
| openrouter   | ROOT + "/v1"         | base + "/chat/completions" (the openai SDK: openai_client) |

OpenRouter's real ROOT is https://openrouter.ai/api (so its SDK base is .../api/v1).
SDK retries are off everywhere, so denials and error statuses surface at once.
"""

from __future__ import annotations

import json as jsonlib
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import anthropic
import openai
import voyageai
from google import genai
from google.genai import types as genai_types

DEFAULT_TIMEOUT = 30.0


def sdk_base_url(provider: str, root: str) -> str:
    """The base URL the provider's SDK is given, from the provider root (see module doc)."""
    root = root.rstrip("/")
    if provider in ("openai", "voyage", "openrouter"):
        return root + "/v1"
    if provider in ("google", "jina", "anthropic", "azure-openai"):
        return root
    raise ValueError(f"unknown provider {provider!r}")


def openai_client(
    root: str,
    key: str,
    async_: bool = False,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    provider: str = "openai",
    **kwargs: Any,
) -> openai.OpenAI | openai.AsyncOpenAI:
    """OpenAI SDK at ROOT + "/v1" (the SDK appends "/chat/completions" etc.), no retries.

    It sends `Authorization: Bearer KEY`, plus `OpenAI-Organization`/`OpenAI-Project`
    only when set, and its `x-stainless-*` telemetry headers. It follows redirects.
    `provider="openrouter"` is the same client for OpenRouter (also ROOT + "/v1"): it
    ignores OpenRouter's `: OPENROUTER PROCESSING` SSE comments.
    """
    if provider not in ("openai", "openrouter"):
        raise ValueError(f"openai_client serves openai and openrouter, not {provider!r}")
    cls = openai.AsyncOpenAI if async_ else openai.OpenAI
    return cls(
        api_key=key,
        base_url=sdk_base_url(provider, root),
        max_retries=0,
        timeout=timeout,
        **kwargs,
    )


def anthropic_client(
    root: str,
    key: str,
    async_: bool = False,
    *,
    key_header: str = "authorization",
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> anthropic.Anthropic | anthropic.AsyncAnthropic:
    """anthropic SDK at ROOT (it appends "/v1/messages"), no retries.

    With `api_key=` the anthropic SDK 2.x sends `Authorization: Bearer KEY` (not
    `x-api-key`), plus `anthropic-version` (its own API version) and `x-stainless-*`
    telemetry. `key_header="x-api-key"` sends the key as `x-api-key: KEY` instead (the
    documented header, as curl and older SDKs send it), with no `Authorization`. Extra
    `default_headers` (e.g. another `anthropic-version`) merge over those.
    """
    cls = anthropic.AsyncAnthropic if async_ else anthropic.Anthropic
    headers: dict[str, Any] = {}
    if key_header == "x-api-key":
        headers = {"x-api-key": key, "Authorization": anthropic.omit}
    elif key_header != "authorization":
        raise ValueError(f"key_header must be 'authorization' or 'x-api-key', not {key_header!r}")
    headers.update(kwargs.pop("default_headers", None) or {})
    return cls(
        api_key=key,
        base_url=sdk_base_url("anthropic", root),
        max_retries=0,
        timeout=timeout,
        default_headers=headers or None,
        **kwargs,
    )


def azure_client(
    root: str,
    key: str,
    async_: bool = False,
    *,
    api_version: str = "2024-10-21",
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> openai.AzureOpenAI | openai.AsyncAzureOpenAI:
    """openai SDK's AzureOpenAI with azure_endpoint=ROOT, no retries.

    The deployment is the `model` argument: it requests
    ROOT + "/openai/deployments/{model}/chat/completions?api-version=API_VERSION" (and
    ".../embeddings"), sending the key as `api-key: KEY` (no `Authorization`), with the
    deployment also as the body's `model`, and `x-stainless-*` telemetry.
    """
    cls = openai.AsyncAzureOpenAI if async_ else openai.AzureOpenAI
    return cls(
        azure_endpoint=sdk_base_url("azure-openai", root),
        api_key=key,
        api_version=api_version,
        max_retries=0,
        timeout=timeout,
        **kwargs,
    )


def genai_client(
    root: str,
    key: str,
    api_version: str = "v1beta",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    headers: dict[str, str] | None = None,
) -> genai.Client:
    """google-genai SDK at ROOT (it appends "/{api_version}/models/..."), no retries.

    Use `client.aio` for the async API. It sends the key as `x-goog-api-key: KEY` (never
    as a query parameter) plus `x-goog-api-client` and `user-agent` telemetry. Retries
    are off through `HttpRetryOptions(attempts=1)`: that also stops the async (aiohttp)
    path's own one-off retry after a 1-10 s sleep on connection errors.
    """
    options = genai_types.HttpOptions(
        base_url=root,
        api_version=api_version,
        timeout=int(timeout * 1000),  # milliseconds
        retry_options=genai_types.HttpRetryOptions(attempts=1),
        headers=headers,
    )
    return genai.Client(api_key=key, vertexai=False, http_options=options)


def voyage_client(
    root: str, key: str, async_: bool = False, *, timeout: float = DEFAULT_TIMEOUT
) -> voyageai.Client | voyageai.AsyncClient:
    """voyageai SDK at ROOT + "/v1" (it appends "/embeddings", "/rerank"), no retries.

    It sends only `Authorization: Bearer KEY` and `Content-Type` of its own (it drops its
    other headers), through `requests` (sync, follows redirects) or aiohttp (async).
    """
    cls = voyageai.AsyncClient if async_ else voyageai.Client
    return cls(api_key=key, max_retries=0, timeout=timeout, base_url=sdk_base_url("voyage", root))


def jina_post(
    root: str,
    key: str | None,
    path: str,
    json: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    """POST JSON to ROOT + "/" + path as Jina's HTTP API is used: (status, headers, body).

    `Authorization: Bearer KEY` unless key is None. Redirects are NOT followed (a 3xx
    is returned as is) and the body is returned as received (no decompression), so
    tests can check pass-through byte for byte. Header names are lower-cased.
    """
    url = root.rstrip("/") + "/" + path.lstrip("/")
    hdrs = {"Content-Type": "application/json", "Accept": "application/json"}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    hdrs.update(headers or {})
    req = urllib.request.Request(  # noqa: S310 - the URL is a test server's http URL
        url, data=jsonlib.dumps(json).encode(), headers=hdrs, method="POST"
    )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, _lower(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, _lower(err.headers.items()), err.read()


async def jina_post_async(
    root: str,
    key: str | None,
    path: str,
    json: Any,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    """`jina_post` with aiohttp: no redirects followed, body not decompressed."""
    url = root.rstrip("/") + "/" + path.lstrip("/")
    hdrs = {"Content-Type": "application/json", "Accept": "application/json"}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    hdrs.update(headers or {})
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=client_timeout) as session,
        session.post(url, data=jsonlib.dumps(json), headers=hdrs, allow_redirects=False) as r,
    ):
        return r.status, _lower(r.headers.items()), await r.read()


def _lower(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
