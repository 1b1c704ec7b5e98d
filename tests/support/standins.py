"""Local stand-ins for the AI providers' HTTP APIs (SPEC §7), for tests without a network.

Each `StandIn` is an aiohttp server on 127.0.0.1 (ephemeral port) running on its own event
loop in a background thread, so sync and async tests can both use it. It checks the
provider credential the way the real API expects it, records every request, and answers
JSON (or SSE) that the provider's real SDK parses into proper objects.

Routes, under `path_prefix` (the provider's base URL path):

- openai: POST v1/chat/completions, v1/responses (both also with `"stream": true`),
  v1/embeddings (`encoding_format` float or base64). Auth `Authorization: Bearer KEY`.
- google: POST {v1beta|v1}/models/{model}:generateContent and :streamGenerateContent
  (`alt=sse` gives SSE, otherwise a streamed JSON array, as the real API). Auth
  `x-goog-api-key: KEY` (or, as Google also accepts, a `key` query parameter).
- jina: POST v1/embeddings, v1/rerank. Auth `Authorization: Bearer KEY`.
- voyage: POST v1/embeddings, v1/rerank. Auth `Authorization: Bearer KEY`.
- anthropic: POST v1/messages (also with `"stream": true`: message_start, content_block_start,
  ping, content_block_delta x n_chunks, content_block_stop, message_delta, message_stop).
  Auth `x-api-key: KEY` (the documented header) or `Authorization: Bearer KEY` (what the
  anthropic SDK 2.x sends for `api_key=`); every one of the two that is present must carry
  the key. An `anthropic-version` header is required (400 without), as the real API.
  Usage: message_start's `message.usage` has input_tokens, cache_read_input_tokens
  (= cached_tokens), cache_creation_input_tokens 0 and output_tokens 1 (as the real API, a
  placeholder); message_delta's `usage.output_tokens` is the final output count.
- azure-openai: POST openai/deployments/{deployment}/chat/completions (also streamed) and
  openai/deployments/{deployment}/embeddings, each needing an `api-version` query
  parameter (404 "Resource not found" without, as Azure). Auth `api-key: KEY`. Answers
  as openai, plus Azure's content-filter fields; a chat stream starts with Azure's extra
  chunk holding `prompt_filter_results` and no choices. The body's `model` is optional
  (the deployment names the model) and is echoed, else the deployment.
- openrouter: POST v1/chat/completions (its real base URL is https://openrouter.ai/api, so
  give `path_prefix="/api"` to mimic it). Auth `Authorization: Bearer KEY`. Answers as
  openai plus `provider`, `native_finish_reason` and usage `cost`; a stream writes a
  `: OPENROUTER PROCESSING` comment before every event (as OpenRouter's keep-alives), and
  the usage chunk when `stream_options.include_usage` (or `usage.include`) is set.

Test hooks, on every provider, at the root or under `path_prefix`, each followed by any
tail (so a broker whose provider base_url is `standin.base_url + "/_status/503"` reaches
the hook on its ordinary routes):

- `/_redirect{tail}` answers `redirect_status` (302) with an absolute `Location` naming
  `/_redirected{tail}` on this server; `/_redirected{tail}` sets `redirected_hit` (and is
  recorded like any request, so a test can see which credential reached it), then serves
  `{tail}` as an ordinary route (POST) or answers `{"redirected": true}`.
- `/_status/{code}{tail}` answers that status in the provider's error shape.
- `/_hang{tail}` never answers (until the stand-in stops), for idle-timeout tests.
- `standin.force = (status, body, headers)` (headers optional) answers the next request
  with exactly that, whatever its path; it is consumed by that request.

Knobs (set them before the request): `chunk_delay`, `n_chunks`, `gzip`, `reset_after`
(RST after N events), `stall_after` (stay open and silent after N events), `force`,
`redirect_status`, and the token counts reported in usage fields (`input_tokens`,
`output_tokens`, `cached_tokens`, `reasoning_tokens`). A "chunk" in `sent_at`,
`reset_after` and `stall_after` is one SSE event (one write + drain); `n_chunks` is the
number of text-carrying events (`pieces()`), so an OpenAI chat stream writes
n_chunks + 3 events (+1 with include_usage), a Responses stream n_chunks + 8, Gemini n_chunks,
Anthropic n_chunks + 6, Azure chat n_chunks + 4 (+1), and OpenRouter chat twice OpenAI's
count (each comment is a write of its own). `stream_events(provider, n_chunks, usage=...)`
computes these.

Observations: `requests` (`Recorded`, in order; `wait_for_requests(n)` blocks until n
arrived), `sent_at`, `redirected_hit`, `last_gzip_body`, and the threading.Events
`hanging` (a /_hang request is held) and `disconnected` (a client went away before its
answer ended: wait on them, e.g. `standin.disconnected.wait(5)`, never sleep).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

PROVIDERS = ("openai", "google", "jina", "voyage", "anthropic", "azure-openai", "openrouter")
# Providers answering in OpenAI's chat-completions / embeddings format.
OPENAI_LIKE = ("openai", "azure-openai", "openrouter")

JSON_TYPE = {
    "openai": "application/json",
    "google": "application/json; charset=UTF-8",
    "jina": "application/json",
    "voyage": "application/json",
    "anthropic": "application/json",
    "azure-openai": "application/json",
    "openrouter": "application/json",
}
SSE_TYPE = {
    "openai": "text/event-stream; charset=utf-8",
    "google": "text/event-stream",
    "anthropic": "text/event-stream; charset=utf-8",
    "azure-openai": "text/event-stream; charset=utf-8",
    "openrouter": "text/event-stream",
}
OPENROUTER_COMMENT = b": OPENROUTER PROCESSING\n\n"

# Google's canonical status names per HTTP status (google.rpc.Code).
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# OpenAI's error `type` and `code` per HTTP status, as its API answers them.
_OPENAI_TYPE: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}
# Anthropic's error `type` per HTTP status (its documented error types).
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def stream_events(provider: str, n_chunks: int = 3, *, usage: bool = False) -> int:
    """How many writes (`sent_at` entries) a chat stream of `provider` makes.

    `usage` is include_usage for the OpenAI-like providers (ignored by the others); for
    google this is streamGenerateContent with alt=sse.
    """
    if provider == "anthropic":
        return n_chunks + 6
    if provider == "google":
        return n_chunks
    if provider not in OPENAI_LIKE:
        raise ValueError(f"{provider!r} has no chat stream")
    events = n_chunks + 3 + (1 if usage else 0) + (1 if provider == "azure-openai" else 0)
    return 2 * events if provider == "openrouter" else events


def error_body(provider: str, status: int, message: str) -> bytes:
    """The provider's own error JSON for `status` (the shapes SPEC §7 names)."""
    if provider == "openai":
        etype, code = _OPENAI_TYPE.get(status, ("server_error", None))
        obj: dict[str, Any] = {
            "error": {"message": message, "type": etype, "param": None, "code": code}
        }
    elif provider == "google":
        obj = {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, "UNKNOWN"),
            }
        }
    elif provider == "anthropic":
        etype = _ANTHROPIC_TYPE.get(status, "api_error")
        obj = {
            "type": "error",
            "error": {"type": etype, "message": message},
            "request_id": "req_standin_error",
        }
    elif provider == "azure-openai":
        # Azure's own errors carry the status as a string code and no type.
        obj = {"error": {"code": str(status), "message": message}}
    elif provider == "openrouter":
        obj = {"error": {"code": status, "message": message}}
    else:
        obj = {"detail": message}
    return json.dumps(obj).encode()


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in received it."""

    method: str
    path: str  # the raw request-target path, not decoded, without the query
    query: str  # the raw query string, without "?"
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


_HOOK_REDIRECT = re.compile(r"^/_redirect(/.*)?$")
_HOOK_REDIRECTED = re.compile(r"^/_redirected(/.*)?$")
_HOOK_STATUS = re.compile(r"^/_status/(\d{3})(/.*)?$")
_HOOK_HANG = re.compile(r"^/_hang(/.*)?$")
_GOOGLE_ROUTE = re.compile(
    r"^/(v1beta|v1)/models/([^/:]+):(generateContent|streamGenerateContent)$"
)
_AZURE_ROUTE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")

_ROUTES: dict[str, tuple[str, ...]] = {
    "openai": ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"),
    "jina": ("/v1/embeddings", "/v1/rerank"),
    "voyage": ("/v1/embeddings", "/v1/rerank"),
    "anthropic": ("/v1/messages",),
    "openrouter": ("/v1/chat/completions",),
}


# Azure's content-filter verdicts for harmless text, on prompts and completions.
_AZURE_FILTERS: dict[str, Any] = {
    name: {"filtered": False, "severity": "safe"}
    for name in ("hate", "self_harm", "sexual", "violence")
}


class _BadRequest(Exception):
    """The request body is not what the real API accepts: answered 400 in its shape."""


class StandIn:
    """A stand-in for one provider's API; see the module docstring for routes and hooks."""

    def __init__(self, provider: str, expected_key: str, *, path_prefix: str = "") -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
        if path_prefix and (not path_prefix.startswith("/") or path_prefix.endswith("/")):
            raise ValueError("path_prefix must start with '/' and not end with one")
        self.provider = provider
        self.expected_key = expected_key
        self.path_prefix = path_prefix
        self.base_url = ""
        self.host = ""
        self.port = 0
        self.requests: list[Recorded] = []
        # Behaviour knobs, read by the server thread at each request.
        self.chunk_delay = 0.0
        self.n_chunks = 3
        self.gzip = False
        self.last_gzip_body: bytes | None = None
        self.reset_after: int | None = None
        self.stall_after: int | None = None
        self.redirect_status = 302
        self.force: tuple[int, bytes] | tuple[int, bytes, dict[str, str]] | None = None
        # Token counts reported in every usage field this provider has.
        self.input_tokens = 7
        self.output_tokens = 5
        self.cached_tokens = 2
        self.reasoning_tokens = 1
        # What happened, for assertions (threading.Events: wait on them, never sleep).
        self.sent_at: list[float] = []
        self.redirected_hit = False
        self.hanging = threading.Event()  # a /_hang request is being held
        self.disconnected = threading.Event()  # a client went away before its answer ended
        self.disconnects = 0
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._start_error: BaseException | None = None

    # -- what tests compare against -------------------------------------------------------

    def pieces(self) -> list[str]:
        """The text pieces a streamed answer carries, one per content chunk."""
        return [f"{self.provider} chunk {i}; " for i in range(self.n_chunks)]

    @property
    def expected_text(self) -> str:
        """The whole answer text (streamed or not)."""
        return "".join(self.pieces())

    @staticmethod
    def embedding(index: int, dims: int = 4) -> list[float]:
        """The vector answered for input `index` (exact in float32, so base64 round-trips)."""
        return [float(index) + j * 0.25 for j in range(dims)]

    @staticmethod
    def rerank_score(index: int, n_docs: int) -> float:
        """The relevance score of document `index`: later documents rank higher."""
        return (index + 1) / (n_docs + 1)

    @property
    def last(self) -> Recorded:
        with self._cond:
            return self.requests[-1]

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """Block until at least `n` requests were recorded; return them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise TimeoutError(f"{len(self.requests)} of {n} requests arrived")
            return list(self.requests)

    def clear(self) -> None:
        """Forget recorded requests and events (knobs are kept)."""
        with self._cond:
            self.requests.clear()
            self.sent_at.clear()
            self.redirected_hit = False
            self.last_gzip_body = None
            self.hanging.clear()
            self.disconnected.clear()
            self.disconnects = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> StandIn:
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"standin-{self.provider}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("stand-in did not start within 10 s")
        if self._start_error is not None:
            raise RuntimeError("stand-in failed to start") from self._start_error
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            if self._stopping is not None:
                loop.call_soon_threadsafe(self._stopping.set)
            if self._runner is not None:
                fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop)
                fut.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # reported to start()'s caller
            self._start_error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _astart(self) -> None:
        self._stopping = asyncio.Event()
        # Large bodies are accepted so that size limits tested are the broker's, not ours.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a client that goes away cancels its handler, so a test
        # can see (via `disconnected`) that the broker dropped the upstream request.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.host}{self.path_prefix}"
        await web.SockSite(self._runner, sock).start()

    # -- dispatch -------------------------------------------------------------------------

    def _record(self, request: web.Request, body: bytes) -> None:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        path, _, query = request.raw_path.partition("?")
        with self._cond:
            self.requests.append(Recorded(request.method, path, query, headers, body))
            self._cond.notify_all()

    def _note_disconnect(self) -> None:
        with self._cond:
            self.disconnects += 1
        self.disconnected.set()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, body)
        forced, self.force = self.force, None
        if forced is not None:
            status, payload, *rest = forced
            headers = dict(rest[0]) if rest else {}
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = JSON_TYPE[self.provider]
            return web.Response(status=status, body=payload, headers=headers)

        path = request.raw_path.partition("?")[0]
        prefixed = not self.path_prefix or path.startswith(self.path_prefix + "/")
        rest = path[len(self.path_prefix) :] if self.path_prefix and prefixed else path

        if m := _HOOK_REDIRECT.match(rest):
            target = f"http://{self.host}{self.path_prefix}/_redirected{m.group(1) or ''}"
            if request.query_string:
                target += "?" + request.query_string
            return web.Response(
                status=self.redirect_status,
                headers={"Location": target, "Content-Type": "text/plain"},
                body=b"redirecting",
            )
        if m := _HOOK_REDIRECTED.match(rest):
            self.redirected_hit = True
            if m.group(1) and request.method == "POST":
                return await self._route(request, m.group(1), body)
            return self._json(200, {"redirected": True})
        if m := _HOOK_STATUS.match(rest):
            status = int(m.group(1))
            if status < 400:
                return web.Response(status=status)
            return self._error(status, f"stand-in answered {status} as asked")
        if _HOOK_HANG.match(rest):
            return await self._hang()
        if not prefixed:
            return self._error(404, f"no route for {path} (stand-in expects {self.path_prefix})")
        return await self._route(request, rest, body)

    async def _route(self, request: web.Request, path: str, body: bytes) -> web.StreamResponse:
        m: re.Match[str] | None = None
        if self.provider == "google":
            m = _GOOGLE_ROUTE.match(path)
            if m is None:
                return self._error(404, f"Requested entity was not found: {path}")
        elif self.provider == "azure-openai":
            m = _AZURE_ROUTE.match(path)
            # Azure answers an unknown path, or one without api-version, 404 before auth.
            if m is None or not request.query.get("api-version"):
                return self._error(404, "Resource not found")
        elif path not in _ROUTES[self.provider]:
            return self._error(404, f"Invalid URL (POST {path})")
        if request.method != "POST":
            return self._error(405, f"Method {request.method} not allowed on {path}")
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        if self.provider == "anthropic" and not request.headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required")
        try:
            try:
                payload = json.loads(body)
            except ValueError as exc:
                raise _BadRequest(f"Invalid JSON payload received: {exc}") from exc
            if not isinstance(payload, dict):
                raise _BadRequest("Invalid JSON payload: expected an object")
            if self.provider in ("openai", "openrouter"):
                return await self._openai(request, path, payload)
            if self.provider == "azure-openai":
                assert m is not None
                return await self._openai(
                    request, f"/v1/{m.group(2)}", payload, deployment=m.group(1)
                )
            if self.provider == "anthropic":
                return await self._anthropic(request, payload)
            if self.provider == "google":
                assert m is not None
                return await self._google(request, m.group(2), m.group(3), payload)
            if path == "/v1/embeddings":
                return self._embeddings(payload)
            return self._rerank(payload)
        except _BadRequest as exc:
            return self._error(400, str(exc))

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self.provider == "google":
            given = request.headers.get("x-goog-api-key") or request.query.get("key")
            if given is None:
                return self._error(
                    401,
                    "Method doesn't allow unregistered callers (callers without established"
                    " identity). Please use API Key or other form of API consumer identity"
                    " to call this API.",
                )
            if given != self.expected_key:
                return self._error(401, "API key not valid. Please pass a valid API key.")
            return None
        if self.provider == "anthropic":
            api_key = request.headers.get("x-api-key")
            bearer = request.headers.get("Authorization")
            if api_key is None and bearer is None:
                return self._error(401, "x-api-key header is required")
            if (api_key is not None and api_key != self.expected_key) or (
                bearer is not None and bearer != f"Bearer {self.expected_key}"
            ):
                return self._error(401, "invalid x-api-key")
            return None
        if self.provider == "azure-openai":
            given = request.headers.get("api-key")
            if given is None:
                return self._error(
                    401,
                    "Access denied due to missing subscription key. Make sure to include"
                    " subscription key when making requests to an API.",
                )
            if given != self.expected_key:
                return self._error(
                    401,
                    "Access denied due to invalid subscription key or wrong API endpoint."
                    " Make sure to provide a valid key for an active subscription and use a"
                    " correct regional API endpoint for your resource.",
                )
            return None
        auth = request.headers.get("Authorization")
        if auth is None:
            message = {
                "openai": "You didn't provide an API key. You need to provide your API key in"
                " an Authorization header using Bearer auth (i.e. Authorization: Bearer"
                " YOUR_KEY).",
                "jina": "Unauthorized: missing Authorization header",
                "voyage": "No API key provided.",
                "openrouter": "No auth credentials found",
            }[self.provider]
            return self._error(401, message)
        if auth != f"Bearer {self.expected_key}":
            message = {
                "openai": "Incorrect API key provided. You can find your API key at"
                " https://platform.openai.com/account/api-keys.",
                "jina": "Unauthorized: invalid API key",
                "voyage": "Provided API key is invalid.",
                "openrouter": "User not found.",
            }[self.provider]
            return self._error(401, message)
        return None

    # -- response helpers -----------------------------------------------------------------

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
        data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
        hdrs = {"Content-Type": JSON_TYPE[self.provider], **(headers or {})}
        for name, value in self._id_headers().items():
            hdrs.setdefault(name, value)
        if self.gzip:
            data = gzip.compress(data, mtime=0)
            self.last_gzip_body = data
            hdrs["Content-Encoding"] = "gzip"
        return web.Response(status=status, body=data, headers=hdrs)

    def _id_headers(self) -> dict[str, str]:
        """The request-id headers the provider's answers carry."""
        if self.provider == "openai":
            return {"x-request-id": f"req_standin_{next(self._ids)}"}
        if self.provider == "azure-openai":
            rid = f"standin-{next(self._ids)}"
            return {"x-request-id": rid, "apim-request-id": rid}
        if self.provider == "anthropic":
            return {"request-id": f"req_standin_{next(self._ids)}"}
        return {}

    def _error(self, status: int, message: str) -> web.Response:
        return self._json(status, error_body(self.provider, status, message))

    async def _hang(self) -> web.StreamResponse:
        self.hanging.set()
        assert self._stopping is not None
        try:
            await self._stopping.wait()
        except asyncio.CancelledError:
            self._note_disconnect()
            raise
        return self._error(503, "stand-in stopping")

    async def _stream(
        self, request: web.Request, events: Iterable[bytes], content_type: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": content_type, **self._id_headers()}
        )
        await resp.prepare(request)
        written = 0
        try:
            for event in events:
                if written and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                # Stamped before the write, so a client that has read event N can rely on
                # sent_at holding N entries (stamping after the drain raced the client).
                self.sent_at.append(time.monotonic())
                await resp.write(event)
                await request.writer.drain()
                written += 1
                if self.reset_after is not None and written >= self.reset_after:
                    self._abort(request)
                    return resp
                if self.stall_after is not None and written >= self.stall_after:
                    assert self._stopping is not None
                    await self._stopping.wait()
                    return resp
            await resp.write_eof()
        except ConnectionError:
            # The client went away mid-stream; returning lets aiohttp finish quietly.
            self._note_disconnect()
        except asyncio.CancelledError:
            # handler_cancellation: the connection was lost while we awaited.
            self._note_disconnect()
            raise
        return resp

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Close the connection with a TCP RST, mid-stream."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    @staticmethod
    def _sse(data: Any, event: str | None = None, *, crlf: bool = False) -> bytes:
        nl = "\r\n" if crlf else "\n"
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event}{nl}" if event else ""
        return f"{head}data: {text}{nl}{nl}".encode()

    def _vectors(self, inputs: list[Any], dims: int, encoding: str) -> list[Any]:
        out: list[Any] = []
        for i in range(len(inputs)):
            vec = self.embedding(i, dims)
            if encoding == "base64":
                out.append(base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode())
            else:
                out.append(vec)
        return out

    # -- openai ---------------------------------------------------------------------------

    async def _openai(
        self,
        request: web.Request,
        path: str,
        payload: dict[str, Any],
        *,
        deployment: str | None = None,
    ) -> web.StreamResponse:
        """openai, and the OpenAI-like azure-openai (`deployment` from its path) and openrouter."""
        model = payload.get("model", deployment)
        if not isinstance(model, str) or not model:
            raise _BadRequest("you must provide a model parameter")
        if path == "/v1/embeddings":
            return self._embeddings(payload, model)
        if path == "/v1/chat/completions":
            if not isinstance(payload.get("messages"), list):
                raise _BadRequest("Missing required parameter: 'messages'.")
            if payload.get("stream"):
                return await self._stream(
                    request, self._chat_events(payload, model), SSE_TYPE[self.provider]
                )
            return self._json(200, self._chat_completion(model))
        if "input" not in payload:
            raise _BadRequest("Missing required parameter: 'input'.")
        if payload.get("stream"):
            return await self._stream(request, self._responses_events(model), SSE_TYPE["openai"])
        return self._json(200, self._response_obj(model, f"resp_standin_{next(self._ids)}"))

    def _chat_usage(self) -> dict[str, Any]:
        usage = self._openai_chat_usage()
        if self.provider == "openrouter":
            # OpenRouter adds what the call cost in credits.
            usage.update(cost=0.000123, is_byok=False)
        return usage

    def _openai_chat_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _chat_completion(self, model: str) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": self.expected_text,
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
        id_prefix = "gen-standin-" if self.provider == "openrouter" else "chatcmpl-standin"
        obj: dict[str, Any] = {
            "id": f"{id_prefix}{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": self._chat_usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }
        if self.provider == "azure-openai":
            choice["content_filter_results"] = _AZURE_FILTERS
            obj["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": _AZURE_FILTERS}
            ]
        elif self.provider == "openrouter":
            obj["provider"] = "OpenAI"
            choice["native_finish_reason"] = "stop"
        return obj

    def _chat_events(self, payload: dict[str, Any], model: str) -> Iterator[bytes]:
        events = self._openai_chat_events(payload, model)
        if self.provider != "openrouter":
            yield from events
            return
        # OpenRouter's keep-alive comments, each written on its own, before every event.
        for event in events:
            yield OPENROUTER_COMMENT
            yield event

    def _openai_chat_events(self, payload: dict[str, Any], model: str) -> Iterator[bytes]:
        options = payload.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        usage_opt = payload.get("usage")
        if self.provider == "openrouter" and isinstance(usage_opt, dict):
            include_usage = include_usage or bool(usage_opt.get("include"))
        openrouter = self.provider == "openrouter"
        id_prefix = "gen-standin-" if openrouter else "chatcmpl-standin"
        base: dict[str, Any] = {
            "id": f"{id_prefix}{next(self._ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }
        if openrouter:
            base["provider"] = "OpenAI"
        # With include_usage, the real API puts "usage": null on every chunk but the last.
        extra: dict[str, Any] = {"usage": None} if include_usage and not openrouter else {}

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            if openrouter:
                choice["native_finish_reason"] = finish
            elif self.provider == "azure-openai":
                choice["content_filter_results"] = _AZURE_FILTERS if delta.get("content") else {}
            return self._sse({**base, "choices": [choice], **extra})

        if self.provider == "azure-openai":
            # Azure's first chunk: the prompt's filter results, no choices, empty id and model.
            yield self._sse(
                {
                    "choices": [],
                    "created": 0,
                    "id": "",
                    "model": "",
                    "object": "",
                    "prompt_filter_results": [
                        {"prompt_index": 0, "content_filter_results": _AZURE_FILTERS}
                    ],
                }
            )
        yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
        for piece in self.pieces():
            yield chunk({"content": piece}, None)
        yield chunk({}, "stop")
        if include_usage:
            yield self._sse({**base, "choices": [], "usage": self._chat_usage()})
        yield self._sse("[DONE]")

    def _response_obj(
        self, model: str, resp_id: str, *, done: bool = True, msg_id: str = "msg_standin"
    ) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        if done:
            output = [self._message_item(msg_id, self.expected_text, done=True)]
            usage = {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.input_tokens + self.output_tokens,
            }
        return {
            "id": resp_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed" if done else "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    @staticmethod
    def _message_item(msg_id: str, text: str, *, done: bool) -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if done
            else []
        )
        return {
            "id": msg_id,
            "type": "message",
            "status": "completed" if done else "in_progress",
            "role": "assistant",
            "content": content,
        }

    def _responses_events(self, model: str) -> Iterator[bytes]:
        n = next(self._ids)
        resp_id, msg_id = f"resp_standin_{n}", f"msg_standin_{n}"
        seq = itertools.count(0)
        text = self.expected_text
        part_empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        part_full = {**part_empty, "text": text}
        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}

        def ev(kind: str, **fields: Any) -> bytes:
            return self._sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

        pending = self._response_obj(model, resp_id, done=False)
        yield ev("response.created", response=pending)
        yield ev("response.in_progress", response=pending)
        yield ev(
            "response.output_item.added",
            output_index=0,
            item=self._message_item(msg_id, "", done=False),
        )
        yield ev("response.content_part.added", part=part_empty, **where)
        for piece in self.pieces():
            yield ev("response.output_text.delta", delta=piece, logprobs=[], **where)
        yield ev("response.output_text.done", text=text, logprobs=[], **where)
        yield ev("response.content_part.done", part=part_full, **where)
        yield ev(
            "response.output_item.done",
            output_index=0,
            item=self._message_item(msg_id, text, done=True),
        )
        yield ev("response.completed", response=self._response_obj(model, resp_id, msg_id=msg_id))

    # -- anthropic ------------------------------------------------------------------------

    async def _anthropic(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model: Field required")
        if not isinstance(payload.get("max_tokens"), int):
            raise _BadRequest("max_tokens: Field required")
        if not isinstance(payload.get("messages"), list):
            raise _BadRequest("messages: Field required")
        msg_id = f"msg_standin{next(self._ids)}"
        if payload.get("stream"):
            events = self._anthropic_events(model, msg_id)
            return await self._stream(request, events, SSE_TYPE["anthropic"])
        message = self._anthropic_message(model, msg_id, done=True)
        return self._json(200, message)

    def _anthropic_message(self, model: str, msg_id: str, *, done: bool) -> dict[str, Any]:
        # Anthropic's input_tokens excludes cache reads, which are counted apart.
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached_tokens,
            # message_start carries a placeholder; message_delta has the real count.
            "output_tokens": self.output_tokens if done else 1,
            "service_tier": "standard",
        }
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": self.expected_text}] if done else [],
            "stop_reason": "end_turn" if done else None,
            "stop_sequence": None,
            "usage": usage,
        }

    def _anthropic_events(self, model: str, msg_id: str) -> Iterator[bytes]:
        def ev(kind: str, **fields: Any) -> bytes:
            return self._sse({"type": kind, **fields}, kind)

        yield ev("message_start", message=self._anthropic_message(model, msg_id, done=False))
        yield ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
        yield ev("ping")
        for piece in self.pieces():
            yield ev("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        yield ev("content_block_stop", index=0)
        yield ev(
            "message_delta",
            delta={"stop_reason": "end_turn", "stop_sequence": None},
            usage={"output_tokens": self.output_tokens},
        )
        yield ev("message_stop")

    # -- google ---------------------------------------------------------------------------

    async def _google(
        self, request: web.Request, model: str, method: str, payload: dict[str, Any]
    ) -> web.StreamResponse:
        if not isinstance(payload.get("contents"), list) or not payload["contents"]:
            raise _BadRequest("* GenerateContentRequest.contents: contents is not specified")
        if method == "generateContent":
            return self._json(200, self._gemini_chunk(model, self.expected_text, final=True))
        pieces = self.pieces()
        chunks = [
            self._gemini_chunk(model, piece, final=i == len(pieces) - 1)
            for i, piece in enumerate(pieces)
        ]
        if request.query.get("alt") == "sse":
            # The real API ends SSE lines with CRLF.
            events = (self._sse(c, crlf=True) for c in chunks)
            return await self._stream(request, events, SSE_TYPE["google"])
        # Without alt=sse the real API streams one JSON array, element by element.
        parts = [("[" if i == 0 else ",\r\n") + json.dumps(c) for i, c in enumerate(chunks)]
        array = (p.encode() for p in [*parts, "]"])
        return await self._stream(request, array, JSON_TYPE["google"])

    def _gemini_chunk(self, model: str, text: str, *, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        # As the real API: every chunk names the prompt's tokens; the last adds the rest.
        usage: dict[str, Any] = {
            "promptTokenCount": self.input_tokens,
            "totalTokenCount": self.input_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.input_tokens}],
        }
        if final:
            candidate["finishReason"] = "STOP"
            candidate["index"] = 0
            usage.update(
                candidatesTokenCount=self.output_tokens,
                cachedContentTokenCount=self.cached_tokens,
                thoughtsTokenCount=self.reasoning_tokens,
                totalTokenCount=self.input_tokens + self.output_tokens + self.reasoning_tokens,
            )
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": f"standin-{next(self._ids)}",
        }

    # -- embeddings and rerank (openai, jina, voyage) -------------------------------------

    def _embeddings(self, payload: dict[str, Any], model: Any = None) -> web.Response:
        model = payload.get("model", model)
        if not isinstance(model, str) or not model:
            raise _BadRequest("model is required")
        raw = payload.get("input")
        if isinstance(raw, str):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw:
            inputs = raw
        else:
            raise _BadRequest("input must be a non-empty string or list")
        if self.provider in OPENAI_LIKE:
            dims = payload.get("dimensions") or 4
            encoding = payload.get("encoding_format") or "float"
        elif self.provider == "voyage":
            dims = payload.get("output_dimension") or 4
            encoding = payload.get("encoding_format") or "float"
        else:
            dims = payload.get("dimensions") or 4
            encoding = payload.get("embedding_type") or "float"
        if encoding not in ("float", "base64") or not isinstance(dims, int):
            raise _BadRequest(f"unsupported encoding {encoding!r} or dimensions {dims!r}")
        data = [
            {"object": "embedding", "index": i, "embedding": vec}
            for i, vec in enumerate(self._vectors(inputs, dims, encoding))
        ]
        if self.provider in OPENAI_LIKE:
            usage = {"prompt_tokens": self.input_tokens, "total_tokens": self.input_tokens}
        elif self.provider == "jina":
            usage = {"total_tokens": self.input_tokens, "prompt_tokens": self.input_tokens}
        else:
            usage = {"total_tokens": self.input_tokens}
        return self._json(200, {"object": "list", "data": data, "model": model, "usage": usage})

    def _rerank(self, payload: dict[str, Any]) -> web.Response:
        model, query, docs = payload.get("model"), payload.get("query"), payload.get("documents")
        if not isinstance(model, str) or not isinstance(query, str):
            raise _BadRequest("model and query are required")
        if not isinstance(docs, list) or not docs:
            raise _BadRequest("documents must be a non-empty list")
        limit = payload.get("top_n" if self.provider == "jina" else "top_k") or len(docs)
        order = sorted(range(len(docs)), key=lambda i: -self.rerank_score(i, len(docs)))
        order = order[:limit]
        usage = {"total_tokens": self.input_tokens}
        if self.provider == "voyage":
            results: list[dict[str, Any]] = [
                {"index": i, "relevance_score": self.rerank_score(i, len(docs))} for i in order
            ]
            if payload.get("return_documents"):
                for r in results:
                    r["document"] = docs[r["index"]]
            return self._json(
                200, {"object": "list", "data": results, "model": model, "usage": usage}
            )
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": self.rerank_score(i, len(docs))}
            if payload.get("return_documents", True):
                doc = docs[i]
                item["document"] = doc if isinstance(doc, dict) else {"text": doc}
            results.append(item)
        return self._json(200, {"model": model, "usage": usage, "results": results})
