"""The provider stand-ins are faithful: each real SDK, driven straight at its stand-in."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
import voyageai
import voyageai.error
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from tests.support.sdk_clients import (
    anthropic_client,
    azure_client,
    genai_client,
    jina_post,
    jina_post_async,
    openai_client,
    sdk_base_url,
    voyage_client,
)
from tests.support.standins import StandIn, error_body, stream_events

OPENAI_KEY = "sk-standin-openai-real"
GOOGLE_KEY = "AIza-standin-google-real"
JINA_KEY = "jina_standin_real"
VOYAGE_KEY = "pa-standin-voyage-real"
ANTHROPIC_KEY = "sk-ant-standin-real"
AZURE_KEY = "azure-standin-real"
OPENROUTER_KEY = "sk-or-standin-real"
WRONG = "wrong-key"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def _standin(provider: str, key: str) -> Iterator[StandIn]:
    with StandIn(provider, key) as standin:
        yield standin


@pytest.fixture
def oai() -> Iterator[StandIn]:
    yield from _standin("openai", OPENAI_KEY)


@pytest.fixture
def goog() -> Iterator[StandIn]:
    yield from _standin("google", GOOGLE_KEY)


@pytest.fixture
def jina() -> Iterator[StandIn]:
    yield from _standin("jina", JINA_KEY)


@pytest.fixture
def voyage() -> Iterator[StandIn]:
    yield from _standin("voyage", VOYAGE_KEY)


@pytest.fixture
def ant() -> Iterator[StandIn]:
    yield from _standin("anthropic", ANTHROPIC_KEY)


@pytest.fixture
def azure() -> Iterator[StandIn]:
    yield from _standin("azure-openai", AZURE_KEY)


@pytest.fixture
def orouter() -> Iterator[StandIn]:
    # OpenRouter's real root is https://openrouter.ai/api: mimic its path.
    with StandIn("openrouter", OPENROUTER_KEY, path_prefix="/api") as standin:
        yield standin


def _openai_events(standin: StandIn, *, usage: bool) -> int:
    """SSE events in a chat stream: role, pieces, finish, [usage], [DONE]."""
    return standin.n_chunks + 3 + (1 if usage else 0)


# -- OpenAI ---------------------------------------------------------------------------------


def test_openai_chat_sync(oai: StandIn) -> None:
    """chat.completions.create reaches POST /v1/chat/completions with the Bearer key."""
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        completion = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == oai.expected_text
    assert completion.model == "gpt-test"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 5)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 2
    (req,) = oai.requests
    assert (req.method, req.path, req.query) == ("POST", "/v1/chat/completions", "")
    assert req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert req.headers["x-stainless-async"] == "false"
    assert req.json()["messages"] == MESSAGES


async def test_openai_chat_async(oai: StandIn) -> None:
    """AsyncOpenAI chat reaches the same route with the Bearer key."""
    async with openai_client(oai.base_url, OPENAI_KEY, async_=True) as client:
        completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == oai.expected_text
    (req,) = oai.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert req.headers["x-stainless-async"].startswith("async:")


def test_openai_chat_stream_sync_with_usage(oai: StandIn) -> None:
    """A chat stream with include_usage yields every piece, then a usage-only chunk."""
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        stream = client.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oai.expected_text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert oai.last.json()["stream"] is True
    assert len(oai.sent_at) == _openai_events(oai, usage=True)


async def test_openai_chat_stream_async_without_usage(oai: StandIn) -> None:
    """An async chat stream without include_usage carries no usage at all."""
    async with openai_client(oai.base_url, OPENAI_KEY, async_=True) as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == oai.expected_text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert len(oai.sent_at) == _openai_events(oai, usage=False)


def test_openai_responses_sync(oai: StandIn) -> None:
    """responses.create reaches POST /v1/responses and parses output_text and usage."""
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        response = client.responses.create(model="gpt-test", input="hello")
    assert response.output_text == oai.expected_text
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 5)
    assert response.usage.output_tokens_details.reasoning_tokens == 1
    assert oai.last.path == "/v1/responses"
    assert oai.last.headers["authorization"] == f"Bearer {OPENAI_KEY}"


async def test_openai_responses_async(oai: StandIn) -> None:
    """Async responses.create parses the same Response object."""
    async with openai_client(oai.base_url, OPENAI_KEY, async_=True) as client:
        response = await client.responses.create(model="gpt-test", input="hello")
    assert response.output_text == oai.expected_text
    assert response.status == "completed"
    assert oai.last.path == "/v1/responses"


def test_openai_responses_stream_helper_sync(oai: StandIn) -> None:
    """responses.stream() accepts the event sequence and assembles the final response."""
    with (
        openai_client(oai.base_url, OPENAI_KEY) as client,
        client.responses.stream(model="gpt-test", input="hello") as stream,
    ):
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == oai.pieces()
    assert final.output_text == oai.expected_text
    assert final.usage is not None and final.usage.input_tokens == 7
    assert oai.last.json()["stream"] is True


async def test_openai_responses_stream_helper_async(oai: StandIn) -> None:
    """The async responses.stream() helper assembles the same final response."""
    async with (
        openai_client(oai.base_url, OPENAI_KEY, async_=True) as client,
        client.responses.stream(model="gpt-test", input="hello") as stream,
    ):
        snapshots = [e.snapshot async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert snapshots[-1] == oai.expected_text
    assert final.output_text == oai.expected_text


async def test_openai_responses_raw_stream_async(oai: StandIn) -> None:
    """responses.create(stream=True) yields the raw typed events in sequence order."""
    async with openai_client(oai.base_url, OPENAI_KEY, async_=True) as client:
        stream = await client.responses.create(model="gpt-test", input="hello", stream=True)
        events = [e async for e in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None


def test_openai_embeddings_sync_default_base64(oai: StandIn) -> None:
    """The SDK asks for base64 by default and decodes it to the stand-in's floats."""
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        result = client.embeddings.create(model="text-embedding-test", input=["a", "b"])
    assert [d.embedding for d in result.data] == [StandIn.embedding(0), StandIn.embedding(1)]
    assert result.usage.prompt_tokens == 7
    assert oai.last.path == "/v1/embeddings"
    assert oai.last.json()["encoding_format"] == "base64"


async def test_openai_embeddings_async_float(oai: StandIn) -> None:
    """An explicit encoding_format=float is answered with float lists."""
    async with openai_client(oai.base_url, OPENAI_KEY, async_=True) as client:
        result = await client.embeddings.create(
            model="text-embedding-test", input="a", encoding_format="float", dimensions=3
        )
    assert result.data[0].embedding == StandIn.embedding(0, 3)
    assert oai.last.json()["encoding_format"] == "float"


def test_openai_wrong_key_raises_authentication_error(oai: StandIn) -> None:
    """A wrong key is 401 in OpenAI's error shape: openai.AuthenticationError."""
    with (
        openai_client(oai.base_url, WRONG) as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert oai.last.headers["authorization"] == f"Bearer {WRONG}"


async def test_openai_wrong_key_async_raises_authentication_error(oai: StandIn) -> None:
    """The async client raises the same AuthenticationError, streaming or not."""
    async with openai_client(oai.base_url, WRONG, async_=True) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)


def test_missing_key_is_401_in_provider_shape(oai: StandIn) -> None:
    """No Authorization header at all is 401 with OpenAI's error JSON."""
    status, _, body = jina_post(oai.base_url, None, "v1/chat/completions", {"model": "m"})
    assert status == 401
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


# -- Google (google-genai) ------------------------------------------------------------------

VERSIONS = pytest.mark.parametrize("version", ["v1", "v1beta"])


def _assert_google_request(standin: StandIn, version: str, method: str, query: str) -> None:
    req = standin.last
    assert (req.method, req.path) == ("POST", f"/{version}/models/gemini-test:{method}")
    assert req.query == query
    assert req.headers["x-goog-api-key"] == GOOGLE_KEY
    assert "authorization" not in req.headers
    assert req.headers["x-goog-api-client"].startswith("google-genai-sdk/")


@VERSIONS
def test_genai_generate_content_sync(goog: StandIn, version: str) -> None:
    """generate_content posts :generateContent under the chosen version with x-goog-api-key."""
    with genai_client(goog.base_url, GOOGLE_KEY, api_version=version) as client:
        response = client.models.generate_content(model="gemini-test", contents="hello")
    assert response.text == goog.expected_text
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (7, 5)
    assert usage.thoughts_token_count == 1 and usage.cached_content_token_count == 2
    _assert_google_request(goog, version, "generateContent", "")


@VERSIONS
def test_genai_generate_content_stream_sync(goog: StandIn, version: str) -> None:
    """generate_content_stream asks alt=sse and parses every CRLF-framed SSE chunk."""
    with genai_client(goog.base_url, GOOGLE_KEY, api_version=version) as client:
        chunks = list(client.models.generate_content_stream(model="gemini-test", contents="hello"))
    assert [c.text for c in chunks] == goog.pieces()
    final = chunks[-1].usage_metadata
    assert final is not None and final.candidates_token_count == 5
    _assert_google_request(goog, version, "streamGenerateContent", "alt=sse")
    assert len(goog.sent_at) == goog.n_chunks


@VERSIONS
async def test_genai_generate_content_async(goog: StandIn, version: str) -> None:
    """client.aio.generate_content (aiohttp transport) reaches the same route."""
    async with genai_client(goog.base_url, GOOGLE_KEY, api_version=version).aio as client:
        response = await client.models.generate_content(model="gemini-test", contents="hello")
    assert response.text == goog.expected_text
    _assert_google_request(goog, version, "generateContent", "")


@VERSIONS
async def test_genai_generate_content_stream_async(goog: StandIn, version: str) -> None:
    """client.aio.generate_content_stream parses the SSE stream over aiohttp."""
    async with genai_client(goog.base_url, GOOGLE_KEY, api_version=version).aio as client:
        stream = await client.models.generate_content_stream(model="gemini-test", contents="hello")
        texts = [chunk.text async for chunk in stream]
    assert texts == goog.pieces()
    _assert_google_request(goog, version, "streamGenerateContent", "alt=sse")


def test_genai_default_api_version_is_v1(goog: StandIn) -> None:
    """Without api_version this google-genai uses v1, appended to the custom base_url."""
    options = genai_types.HttpOptions(
        base_url=goog.base_url, retry_options=genai_types.HttpRetryOptions(attempts=1)
    )
    with genai.Client(api_key=GOOGLE_KEY, vertexai=False, http_options=options) as client:
        client.models.generate_content(model="gemini-test", contents="hello")
    assert goog.last.path == "/v1/models/gemini-test:generateContent"


def test_genai_wrong_key_raises_client_error(goog: StandIn) -> None:
    """A wrong key is 401 in Google's shape: google.genai.errors.ClientError."""
    with (
        genai_client(goog.base_url, WRONG) as client,
        pytest.raises(genai_errors.ClientError) as info,
    ):
        client.models.generate_content(model="gemini-test", contents="hello")
    assert (info.value.code, info.value.status) == (401, "UNAUTHENTICATED")
    assert goog.last.headers["x-goog-api-key"] == WRONG


async def test_genai_wrong_key_async_stream_raises_client_error(goog: StandIn) -> None:
    """The async stream is lazy: its first iteration raises the same ClientError."""
    async with genai_client(goog.base_url, WRONG).aio as client:
        stream = await client.models.generate_content_stream(model="gemini-test", contents="hi")
        assert goog.requests == []
        with pytest.raises(genai_errors.ClientError) as info:
            async for _ in stream:
                pass
    assert info.value.code == 401


def test_google_key_query_param_and_json_array_stream(goog: StandIn) -> None:
    """Google also takes ?key=, and streamGenerateContent without alt=sse is a JSON array."""
    path = f"v1beta/models/gemini-test:streamGenerateContent?key={GOOGLE_KEY}"
    status, headers, body = jina_post(goog.base_url, None, path, {"contents": [{}]})
    assert status == 200 and headers["content-type"].startswith("application/json")
    chunks = json.loads(body)
    assert [c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks] == goog.pieces()


# -- Anthropic ------------------------------------------------------------------------------

ANTHROPIC_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ANTHROPIC_STREAM_KINDS = [
    "message_start",
    "content_block_start",
    "ping",
    *["content_block_delta"] * 3,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def _text(message: anthropic.types.Message) -> str:
    """The text of a Message made of text blocks only."""
    assert all(isinstance(b, anthropic.types.TextBlock) for b in message.content)
    return "".join(b.text for b in message.content if isinstance(b, anthropic.types.TextBlock))


def _anthropic_raw(standin: StandIn, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
    status, _, raw = jina_post(standin.base_url, None, "v1/messages", body, headers=headers)
    return status, raw


def test_anthropic_messages_sync(ant: StandIn) -> None:
    """messages.create posts ROOT/v1/messages with the key as Bearer and anthropic-version."""
    with anthropic_client(ant.base_url, ANTHROPIC_KEY) as client:
        message = client.messages.create(model="claude-test", max_tokens=64, messages=MESSAGES)
    assert [b.type for b in message.content] == ["text"]
    assert _text(message) == ant.expected_text
    assert (message.model, message.stop_reason, message.role) == (
        "claude-test",
        "end_turn",
        "assistant",
    )
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens) == (7, 5, 2)
    (req,) = ant.requests
    assert (req.method, req.path, req.query) == ("POST", "/v1/messages", "")
    assert req.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert "x-api-key" not in req.headers
    assert ANTHROPIC_VERSION.match(req.headers["anthropic-version"])
    assert req.json() == {"model": "claude-test", "max_tokens": 64, "messages": MESSAGES}


async def test_anthropic_messages_async(ant: StandIn) -> None:
    """AsyncAnthropic reaches the same route and parses the same Message."""
    async with anthropic_client(ant.base_url, ANTHROPIC_KEY, async_=True) as client:
        message = await client.messages.create(
            model="claude-test", max_tokens=64, messages=MESSAGES
        )
    assert _text(message) == ant.expected_text
    assert message.usage.output_tokens == 5
    assert ant.last.headers["x-stainless-async"].startswith("async:")
    assert ant.last.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"


def test_anthropic_stream_helper_sync(ant: StandIn) -> None:
    """messages.stream() yields every piece and a final message with both usage halves."""
    with (
        anthropic_client(ant.base_url, ANTHROPIC_KEY) as client,
        client.messages.stream(model="claude-test", max_tokens=64, messages=MESSAGES) as stream,
    ):
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == ant.pieces()
    assert _text(final) == ant.expected_text
    assert final.stop_reason == "end_turn"
    # input and cache reads come from message_start, output from message_delta.
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (7, 2)
    assert final.usage.output_tokens == 5
    req = ant.last
    assert req.json()["stream"] is True
    assert req.headers["x-stainless-helper-method"] == "stream"
    assert len(ant.sent_at) == stream_events("anthropic", ant.n_chunks)


async def test_anthropic_stream_helper_async(ant: StandIn) -> None:
    """The async messages.stream() helper assembles the same final message."""
    ant.n_chunks = 5
    async with (
        anthropic_client(ant.base_url, ANTHROPIC_KEY, async_=True) as client,
        client.messages.stream(model="claude-test", max_tokens=64, messages=MESSAGES) as stream,
    ):
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == ant.pieces() and len(texts) == 5
    assert final.usage.output_tokens == 5
    assert len(ant.sent_at) == stream_events("anthropic", 5)


def test_anthropic_raw_stream_events(ant: StandIn) -> None:
    """create(stream=True) yields the typed events in order; the SDK drops the ping."""
    with anthropic_client(ant.base_url, ANTHROPIC_KEY) as client:
        events = list(
            client.messages.create(
                model="claude-test", max_tokens=64, messages=MESSAGES, stream=True
            )
        )
    assert [e.type for e in events] == [k for k in ANTHROPIC_STREAM_KINDS if k != "ping"]
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert (start.message.usage.input_tokens, start.message.usage.output_tokens) == (7, 1)
    assert delta.usage.output_tokens == 5


def test_anthropic_wire_stream_has_ping_and_usage_events(ant: StandIn) -> None:
    """On the wire: named SSE events, a ping, usage in message_start and message_delta."""
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "claude-test", "max_tokens": 8, "messages": MESSAGES, "stream": True}
    status, raw = _anthropic_raw(ant, headers, body)
    assert status == 200
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == ""
    events = [b.split("\n") for b in blocks[:-1]]
    assert [e[0] for e in events] == [f"event: {k}" for k in ANTHROPIC_STREAM_KINDS]
    data = [json.loads(e[1].removeprefix("data: ")) for e in events]
    assert [d["type"] for d in data] == ANTHROPIC_STREAM_KINDS
    assert data[0]["message"]["usage"]["input_tokens"] == 7
    assert data[0]["message"]["usage"]["cache_read_input_tokens"] == 2
    assert data[-2]["usage"] == {"output_tokens": 5}
    assert ant.last.headers["x-api-key"] == ANTHROPIC_KEY


def test_anthropic_x_api_key_header(ant: StandIn) -> None:
    """key_header="x-api-key" sends the documented header alone, and it is accepted."""
    with anthropic_client(ant.base_url, ANTHROPIC_KEY, key_header="x-api-key") as client:
        message = client.messages.create(model="claude-test", max_tokens=8, messages=MESSAGES)
    assert _text(message) == ant.expected_text
    assert ant.last.headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in ant.last.headers


def test_anthropic_wrong_key_raises_authentication_error(ant: StandIn) -> None:
    """A wrong key is 401 in Anthropic's shape: anthropic.AuthenticationError."""
    with (
        anthropic_client(ant.base_url, WRONG) as client,
        pytest.raises(anthropic.AuthenticationError) as info,
    ):
        client.messages.create(model="claude-test", max_tokens=8, messages=MESSAGES)
    err = info.value
    assert (err.status_code, err.type, err.api_message) == (
        401,
        "authentication_error",
        "invalid x-api-key",
    )
    assert err.request_id is not None and err.request_id.startswith("req_")
    assert ant.last.headers["authorization"] == f"Bearer {WRONG}"


async def test_anthropic_wrong_key_async_stream_raises(ant: StandIn) -> None:
    """The async stream helper raises the same AuthenticationError on entry."""
    async with anthropic_client(ant.base_url, WRONG, async_=True, key_header="x-api-key") as c:
        with pytest.raises(anthropic.AuthenticationError):
            async with c.messages.stream(model="m", max_tokens=8, messages=MESSAGES) as stream:
                await stream.get_final_message()
    assert ant.last.headers["x-api-key"] == WRONG


def test_anthropic_key_in_either_header_must_match(ant: StandIn) -> None:
    """No key is 401; a good x-api-key with a wrong Bearer is 401; no version is 400."""
    body = {"model": "claude-test", "max_tokens": 8, "messages": MESSAGES}
    version = {"anthropic-version": "2023-06-01"}
    cases = [
        (version, 401, "authentication_error"),
        (
            {**version, "x-api-key": ANTHROPIC_KEY, "Authorization": f"Bearer {WRONG}"},
            401,
            "authentication_error",
        ),
        ({"x-api-key": ANTHROPIC_KEY}, 400, "invalid_request_error"),
    ]
    for headers, status, etype in cases:
        got, raw = _anthropic_raw(ant, headers, body)
        assert got == status
        answer = json.loads(raw)
        assert answer["type"] == "error" and answer["error"]["type"] == etype


ANTHROPIC_ERRORS = [
    (401, anthropic.AuthenticationError),
    (403, anthropic.PermissionDeniedError),
    (404, anthropic.NotFoundError),
    (413, anthropic.ContentTooLargeError),
    (429, anthropic.RateLimitError),
    (502, anthropic.InternalServerError),
    (503, anthropic.ServiceUnavailableError),
    (529, anthropic.OverloadedError),
]


@pytest.mark.parametrize(("status", "exc"), ANTHROPIC_ERRORS)
def test_status_hook_anthropic_exceptions(ant: StandIn, status: int, exc: type) -> None:
    """/_status/N makes the anthropic SDK raise its class for N, with the error type."""
    with (
        anthropic_client(f"{ant.base_url}/_status/{status}", ANTHROPIC_KEY) as client,
        pytest.raises(exc) as info,
    ):
        client.messages.create(model="m", max_tokens=8, messages=MESSAGES)
    assert type(info.value) is exc
    assert info.value.type == json.loads(error_body("anthropic", status, ""))["error"]["type"]
    assert ant.last.path == f"/_status/{status}/v1/messages"


# -- Azure OpenAI ---------------------------------------------------------------------------


def test_azure_chat_sync(azure: StandIn) -> None:
    """AzureOpenAI posts /openai/deployments/{model}/chat/completions?api-version with api-key."""
    with azure_client(azure.base_url, AZURE_KEY) as client:
        completion = client.chat.completions.create(model="my-gpt", messages=MESSAGES)
    assert completion.choices[0].message.content == azure.expected_text
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 5)
    assert completion.model_extra is not None
    assert completion.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    (req,) = azure.requests
    assert req.path == "/openai/deployments/my-gpt/chat/completions"
    assert req.query == "api-version=2024-10-21"
    assert req.headers["api-key"] == AZURE_KEY
    assert "authorization" not in req.headers
    assert req.json()["model"] == "my-gpt"


async def test_azure_chat_stream_async_with_usage(azure: StandIn) -> None:
    """An Azure stream opens with a choice-less filter chunk and ends with usage."""
    async with azure_client(azure.base_url, AZURE_KEY, async_=True, api_version="2025-01-01") as c:
        stream = await c.chat.completions.create(
            model="my-gpt",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    first, last = chunks[0], chunks[-1]
    assert first.choices == [] and first.usage is None
    assert first.model_extra is not None and "prompt_filter_results" in first.model_extra
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == azure.expected_text
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens == 12
    assert azure.last.query == "api-version=2025-01-01"
    assert len(azure.sent_at) == stream_events("azure-openai", azure.n_chunks, usage=True)


def test_azure_chat_stream_sync_without_usage(azure: StandIn) -> None:
    """Without include_usage an Azure stream carries no usage at all."""
    with azure_client(azure.base_url, AZURE_KEY) as client:
        stream = client.chat.completions.create(model="my-gpt", messages=MESSAGES, stream=True)
        chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(azure.sent_at) == stream_events("azure-openai", azure.n_chunks)


def test_azure_embeddings_sync(azure: StandIn) -> None:
    """embeddings.create posts /openai/deployments/{model}/embeddings (base64 by default)."""
    with azure_client(azure.base_url, AZURE_KEY) as client:
        result = client.embeddings.create(model="my-embed", input=["a", "b"])
    assert [d.embedding for d in result.data] == [StandIn.embedding(0), StandIn.embedding(1)]
    assert result.usage.prompt_tokens == 7
    req = azure.last
    assert (req.path, req.query) == (
        "/openai/deployments/my-embed/embeddings",
        "api-version=2024-10-21",
    )
    assert req.json()["encoding_format"] == "base64"


def test_azure_wrong_key_raises_authentication_error(azure: StandIn) -> None:
    """A wrong api-key is 401 in Azure's shape: openai.AuthenticationError."""
    with (
        azure_client(azure.base_url, WRONG) as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.chat.completions.create(model="my-gpt", messages=MESSAGES)
    assert info.value.status_code == 401
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "401"
    assert azure.last.headers["api-key"] == WRONG


async def test_azure_wrong_key_async_embeddings_raises(azure: StandIn) -> None:
    """The async Azure client raises the same AuthenticationError."""
    async with azure_client(azure.base_url, WRONG, async_=True) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model="my-embed", input="a")


def test_azure_needs_api_version_and_api_key(azure: StandIn) -> None:
    """Without api-version Azure answers 404 Resource not found; without api-key 401."""
    path = "openai/deployments/my-gpt/chat/completions"
    body = {"messages": MESSAGES}
    status, _, raw = jina_post(azure.base_url, None, path, body, headers={"api-key": AZURE_KEY})
    assert status == 404
    assert json.loads(raw) == {"error": {"code": "404", "message": "Resource not found"}}
    status, _, raw = jina_post(azure.base_url, None, f"{path}?api-version=2024-10-21", body)
    assert status == 401 and json.loads(raw)["error"]["code"] == "401"
    # The deployment names the model: a body without one is answered.
    status, _, raw = jina_post(
        azure.base_url, None, f"{path}?api-version=2024-10-21", body, headers={"api-key": AZURE_KEY}
    )
    assert status == 200 and json.loads(raw)["model"] == "my-gpt"


# -- OpenRouter -----------------------------------------------------------------------------


def test_openrouter_chat_sync(orouter: StandIn) -> None:
    """The openai SDK at ROOT/v1 posts /api/v1/chat/completions and parses usage and cost."""
    with openai_client(orouter.base_url, OPENROUTER_KEY, provider="openrouter") as client:
        completion = client.chat.completions.create(model="openai/gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == orouter.expected_text
    assert completion.model == "openai/gpt-test"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 5)
    assert completion.usage.model_extra is not None and completion.usage.model_extra["cost"] > 0
    assert completion.model_extra is not None and completion.model_extra["provider"] == "OpenAI"
    (req,) = orouter.requests
    assert (req.path, req.query) == ("/api/v1/chat/completions", "")
    assert req.headers["authorization"] == f"Bearer {OPENROUTER_KEY}"


def test_openrouter_stream_sync_with_usage(orouter: StandIn) -> None:
    """A stream with comments between events parses; include_usage adds a usage chunk."""
    with openai_client(orouter.base_url, OPENROUTER_KEY, provider="openrouter") as client:
        stream = client.chat.completions.create(
            model="openai/gpt-test",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == orouter.expected_text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert len(orouter.sent_at) == stream_events("openrouter", orouter.n_chunks, usage=True)


async def test_openrouter_stream_async_without_usage(orouter: StandIn) -> None:
    """An async stream without include_usage carries no usage."""
    async with openai_client(
        orouter.base_url, OPENROUTER_KEY, async_=True, provider="openrouter"
    ) as client:
        stream = await client.chat.completions.create(
            model="openai/gpt-test", messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == orouter.expected_text
    assert all(c.usage is None for c in chunks)
    assert len(orouter.sent_at) == stream_events("openrouter", orouter.n_chunks)


def test_openrouter_wire_stream_interleaves_comments(orouter: StandIn) -> None:
    """On the wire a `: OPENROUTER PROCESSING` comment precedes each data event."""
    body = {"model": "m", "messages": MESSAGES, "stream": True, "usage": {"include": True}}
    status, headers, raw = jina_post(orouter.base_url, OPENROUTER_KEY, "v1/chat/completions", body)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    blocks = raw.decode().split("\n\n")[:-1]
    assert blocks[0::2] == [": OPENROUTER PROCESSING"] * (len(blocks) // 2)
    data = [b.removeprefix("data: ") for b in blocks[1::2]]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["usage"]["prompt_tokens"] == 7


async def test_openrouter_wrong_key_raises_authentication_error(orouter: StandIn) -> None:
    """A wrong key is 401 {"error": {"code": 401}}: openai.AuthenticationError."""
    async with openai_client(orouter.base_url, WRONG, async_=True, provider="openrouter") as c:
        with pytest.raises(openai.AuthenticationError) as info:
            await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == 401
    assert orouter.last.headers["authorization"] == f"Bearer {WRONG}"


def test_sdk_base_urls_new_providers() -> None:
    """anthropic and Azure take ROOT; OpenRouter's openai SDK takes ROOT/v1."""
    root = "http://127.0.0.1:1/proxy/x"
    assert sdk_base_url("anthropic", root) == sdk_base_url("azure-openai", root + "/") == root
    assert sdk_base_url("openrouter", root) == root + "/v1"
    with pytest.raises(ValueError):
        openai_client(root, "k", provider="anthropic")


# -- Voyage ---------------------------------------------------------------------------------


def test_voyage_embed_sync(voyage: StandIn) -> None:
    """voyageai embed posts /v1/embeddings (base64 by default) with the Bearer key."""
    client = voyage_client(voyage.base_url, VOYAGE_KEY)
    result = client.embed(["a", "b"], model="voyage-test")
    assert result.embeddings == [StandIn.embedding(0), StandIn.embedding(1)]
    assert result.total_tokens == 7
    req = voyage.last
    assert (req.path, req.headers["authorization"]) == ("/v1/embeddings", f"Bearer {VOYAGE_KEY}")
    assert req.json()["encoding_format"] == "base64"


async def test_voyage_embed_async(voyage: StandIn) -> None:
    """The async voyageai client (aiohttp) embeds through the same route."""
    client = voyage_client(voyage.base_url, VOYAGE_KEY, async_=True)
    result = await client.embed(["a"], model="voyage-test", output_dimension=2)
    assert result.embeddings == [StandIn.embedding(0, 2)]
    assert voyage.last.path == "/v1/embeddings"


def test_voyage_rerank_sync(voyage: StandIn) -> None:
    """voyageai rerank posts /v1/rerank and maps results back to the documents."""
    client = voyage_client(voyage.base_url, VOYAGE_KEY)
    result = client.rerank("q", ["a", "b", "c"], model="rerank-test", top_k=2)
    assert [(r.index, r.document) for r in result.results] == [(2, "c"), (1, "b")]
    assert result.results[0].relevance_score == StandIn.rerank_score(2, 3)
    assert result.total_tokens == 7
    assert voyage.last.path == "/v1/rerank"
    assert voyage.last.json()["top_k"] == 2


async def test_voyage_rerank_async(voyage: StandIn) -> None:
    """The async voyageai client reranks through the same route."""
    client = voyage_client(voyage.base_url, VOYAGE_KEY, async_=True)
    result = await client.rerank("q", ["a", "b"], model="rerank-test")
    assert [r.document for r in result.results] == ["b", "a"]
    assert voyage.last.headers["authorization"] == f"Bearer {VOYAGE_KEY}"


def test_voyage_wrong_key_raises_authentication_error(voyage: StandIn) -> None:
    """A wrong key is 401 {"detail"}: voyageai.error.AuthenticationError."""
    client = voyage_client(voyage.base_url, WRONG)
    with pytest.raises(voyageai.error.AuthenticationError) as info:
        client.embed(["a"], model="voyage-test")
    assert info.value.http_status == 401
    assert "invalid" in str(info.value)


async def test_voyage_wrong_key_async_raises_authentication_error(voyage: StandIn) -> None:
    """The async client raises the same AuthenticationError."""
    client = voyage_client(voyage.base_url, WRONG, async_=True)
    with pytest.raises(voyageai.error.AuthenticationError):
        await client.rerank("q", ["a"], model="rerank-test")


# -- Jina (plain HTTP) ----------------------------------------------------------------------


def test_jina_embeddings(jina: StandIn) -> None:
    """POST v1/embeddings answers Jina's list shape with usage.total_tokens."""
    status, headers, body = jina_post(
        jina.base_url, JINA_KEY, "v1/embeddings", {"model": "jina-test", "input": ["a", "b"]}
    )
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)
    assert [d["embedding"] for d in data["data"]] == [StandIn.embedding(0), StandIn.embedding(1)]
    assert data["usage"]["total_tokens"] == 7
    assert jina.last.path == "/v1/embeddings"
    assert jina.last.headers["authorization"] == f"Bearer {JINA_KEY}"


async def test_jina_rerank_async(jina: StandIn) -> None:
    """POST v1/rerank (aiohttp) answers results with index, document.text and score."""
    status, _, body = await jina_post_async(
        jina.base_url,
        JINA_KEY,
        "v1/rerank",
        {"model": "jina-reranker", "query": "q", "documents": ["a", "b", "c"], "top_n": 2},
    )
    assert status == 200
    data = json.loads(body)
    assert [(r["index"], r["document"]["text"]) for r in data["results"]] == [(2, "c"), (1, "b")]
    assert data["usage"]["total_tokens"] == 7
    assert jina.last.path == "/v1/rerank"


def test_jina_wrong_and_missing_key_are_401_detail(jina: StandIn) -> None:
    """A wrong or missing key is 401 {"detail": ...}."""
    for key in (WRONG, None):
        status, _, body = jina_post(jina.base_url, key, "v1/embeddings", {"model": "m"})
        assert status == 401
        assert set(json.loads(body)) == {"detail"}


# -- Error statuses: which exception each SDK raises ----------------------------------------

OPENAI_ERRORS = [
    (401, openai.AuthenticationError),
    (403, openai.PermissionDeniedError),
    (404, openai.NotFoundError),
    (413, openai.APIStatusError),
    (429, openai.RateLimitError),
    (502, openai.InternalServerError),
    (503, openai.InternalServerError),
]


@pytest.mark.parametrize(("status", "exc"), OPENAI_ERRORS)
def test_status_hook_openai_exceptions(oai: StandIn, status: int, exc: type) -> None:
    """/_status/N under the base URL makes the OpenAI SDK raise its class for N."""
    with (
        openai_client(f"{oai.base_url}/_status/{status}", OPENAI_KEY) as client,
        pytest.raises(exc) as info,
    ):
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert type(info.value) is exc
    assert oai.last.path == f"/_status/{status}/v1/chat/completions"


@pytest.mark.parametrize("status", [401, 403, 404, 413, 429, 502, 503])
def test_status_hook_genai_exceptions(goog: StandIn, status: int) -> None:
    """google-genai raises ClientError for 4xx and ServerError for 5xx, with code and status."""
    expected = genai_errors.ClientError if status < 500 else genai_errors.ServerError
    with (
        genai_client(f"{goog.base_url}/_status/{status}", GOOGLE_KEY) as client,
        pytest.raises(expected) as info,
    ):
        client.models.generate_content(model="gemini-test", contents="hello")
    assert info.value.code == status
    assert info.value.status == json.loads(error_body("google", status, ""))["error"]["status"]


VOYAGE_ERRORS = [
    (401, voyageai.error.AuthenticationError),
    (403, voyageai.error.APIError),
    (404, voyageai.error.APIError),
    (413, voyageai.error.APIError),
    (429, voyageai.error.RateLimitError),
    (502, voyageai.error.ServiceUnavailableError),
    (503, voyageai.error.ServiceUnavailableError),
]


@pytest.mark.parametrize(("status", "exc"), VOYAGE_ERRORS)
def test_status_hook_voyage_exceptions(voyage: StandIn, status: int, exc: type) -> None:
    """voyageai raises its class for N (a generic APIError where it has none)."""
    client = voyage_client(f"{voyage.base_url}/_status/{status}", VOYAGE_KEY)
    with pytest.raises(exc) as info:
        client.embed(["a"], model="voyage-test")
    assert type(info.value) is exc
    assert info.value.http_status == status


# -- Test hooks -----------------------------------------------------------------------------


def test_redirect_hook_answers_302_without_following(jina: StandIn) -> None:
    """/_redirect answers 302 to this server's /_redirected; a non-following client stops."""
    status, headers, _ = jina_post(
        f"{jina.base_url}/_redirect", JINA_KEY, "v1/embeddings", {"model": "m", "input": "a"}
    )
    assert status == 302
    assert headers["location"] == f"http://{jina.host}/_redirected/v1/embeddings"
    assert jina.redirected_hit is False


def test_redirect_hook_followed_by_sdk_is_recorded(oai: StandIn) -> None:
    """The OpenAI SDK follows a 307 and carries the key to /_redirected: it is recorded."""
    oai.redirect_status = 307
    with openai_client(f"{oai.base_url}/_redirect", OPENAI_KEY) as client:
        completion = client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == oai.expected_text
    assert oai.redirected_hit is True
    followed = oai.last
    assert followed.path == "/_redirected/v1/chat/completions"
    assert followed.headers["authorization"] == f"Bearer {OPENAI_KEY}"


def test_hang_hook_times_out_and_sees_disconnect(oai: StandIn) -> None:
    """/_hang never answers: the SDK's timeout fires and the stand-in sees the disconnect."""
    with (
        openai_client(f"{oai.base_url}/_hang", OPENAI_KEY, timeout=0.3) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert oai.hanging.is_set()
    assert oai.disconnected.wait(5)


def test_reset_after_breaks_stream_mid_way(oai: StandIn) -> None:
    """reset_after closes the connection with a RST after N events: APIConnectionError."""
    oai.reset_after = 2
    received: list[str] = []
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIConnectionError):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert received == ["", oai.pieces()[0]]
    assert len(oai.sent_at) == 2


def test_reset_after_surfaces_as_transport_error_in_genai(goog: StandIn) -> None:
    """google-genai does not wrap a mid-stream reset: the raw httpx2.ReadError escapes."""
    goog.reset_after = 1
    received: list[str | None] = []
    with (
        genai_client(goog.base_url, GOOGLE_KEY) as client,
        pytest.raises(httpx2.ReadError),
    ):
        for chunk in client.models.generate_content_stream(model="gemini-test", contents="hi"):
            received.append(chunk.text)
    assert received == goog.pieces()[:1]


def test_stall_after_holds_stream_open(oai: StandIn) -> None:
    """stall_after keeps the stream open and silent after N events: a read timeout."""
    oai.stall_after = 1
    with openai_client(oai.base_url, OPENAI_KEY, timeout=0.3) as client:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APITimeoutError):
            list(stream)
    assert oai.disconnected.wait(5)


def test_gzip_body_is_kept_byte_for_byte(jina: StandIn) -> None:
    """gzip=True compresses JSON answers and keeps the exact bytes for comparison."""
    jina.gzip = True
    status, headers, body = jina_post(
        jina.base_url, JINA_KEY, "v1/embeddings", {"model": "m", "input": "a"}
    )
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert body == jina.last_gzip_body
    assert json.loads(gzip.decompress(body))["usage"]["total_tokens"] == 7


def test_gzip_answer_parses_in_sdk(oai: StandIn) -> None:
    """The OpenAI SDK decompresses a gzip answer transparently."""
    oai.gzip = True
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        completion = client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == oai.expected_text
    assert oai.last_gzip_body is not None


def test_force_answers_next_request_only(voyage: StandIn) -> None:
    """force answers exactly the next request, then normal routing resumes."""
    voyage.force = (429, b'{"detail": "slow down"}', {"Retry-After": "7"})
    client = voyage_client(voyage.base_url, VOYAGE_KEY)
    with pytest.raises(voyageai.error.RateLimitError) as info:
        client.embed(["a"], model="voyage-test")
    assert info.value.headers["Retry-After"] == "7"
    assert client.embed(["a"], model="voyage-test").total_tokens == 7


def test_chunk_delay_paces_stream_and_records_sent_at(oai: StandIn) -> None:
    """chunk_delay spaces events; sent_at stamps each one before the client reads it."""
    oai.chunk_delay = 0.05
    arrived: list[float] = []
    with openai_client(oai.base_url, OPENAI_KEY) as client:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        for _ in stream:
            arrived.append(time.monotonic())
    sent = oai.sent_at
    assert len(sent) == _openai_events(oai, usage=False)
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(sent))
    # Each parsed chunk reached the SDK before the next one was even sent.
    assert len(arrived) == len(sent) - 1  # [DONE] is not yielded
    for i, t in enumerate(arrived):
        assert t < sent[i + 1]


def test_path_prefix_is_part_of_base_url() -> None:
    """With a path_prefix, routes live under it and the bare root path is 404."""
    with StandIn("openai", OPENAI_KEY, path_prefix="/api") as standin:
        assert standin.base_url == f"http://{standin.host}/api"
        with openai_client(standin.base_url, OPENAI_KEY) as client:
            client.embeddings.create(model="m", input="a")
        assert standin.last.path == "/api/v1/embeddings"
        status, _, _ = jina_post(f"http://{standin.host}", OPENAI_KEY, "v1/embeddings", {})
        assert status == 404


def test_sdk_base_urls() -> None:
    """openai and voyage SDKs take ROOT/v1; google-genai and Jina take ROOT."""
    root = "http://127.0.0.1:1/proxy/x"
    assert sdk_base_url("openai", root) == root + "/v1"
    assert sdk_base_url("voyage", root + "/") == root + "/v1"
    assert sdk_base_url("google", root) == sdk_base_url("jina", root) == root
