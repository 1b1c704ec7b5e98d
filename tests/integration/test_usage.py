"""Usage read from the providers' own fields as streams pass, budgets, configured providers."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from broker.client import BrokerClient
from tests.conftest import Cli, grant, start_daemon, wait_for, write_grants
from tests.support.gateway import Broker, configure, race_a_budget, real_key
from tests.support.sdk_clients import genai_client, jina_post, openai_client, voyage_client
from tests.support.standins import StandIn

MESSAGES = [{"role": "user", "content": "hi"}]


def usage_rows(cli: Cli, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(cli.ok("usage", "--json", *args)))


def row_for(cli: Cli, requests: int, **match: Any) -> dict[str, Any]:
    """Poll until the daemon's flush shows a row matching `match` with `requests` requests."""
    def found() -> dict[str, Any] | None:
        for row in usage_rows(cli):
            if all(row[k] == v for k, v in match.items()) and row["requests"] >= requests:
                return row
        return None

    return dict(wait_for(found, timeout=10, what=f"a usage row {match}"))


def tokens(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["input_tokens"], row["output_tokens"], row["cached_tokens"],
            row["reasoning_tokens"])


def test_openai_chat_with_and_without_stream_usage(gateway: Broker) -> None:
    """Chat usage comes from the body, or the stream's usage chunk; without it, unknown."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    stand = gateway.standins["openai"]
    client.chat.completions.create(model="gpt-a", messages=MESSAGES)
    row = row_for(gateway.cli, 1, model="gpt-a", route="v1/chat/completions")
    assert tokens(row) == (stand.input_tokens, stand.output_tokens, stand.cached_tokens,
                           stand.reasoning_tokens)
    assert row["consumer"] == "default" and row["provider"] == "openai" and row["errors"] == 0
    list(client.chat.completions.create(model="gpt-b", messages=MESSAGES, stream=True,
                                        stream_options={"include_usage": True}))
    assert tokens(row_for(gateway.cli, 1, model="gpt-b"))[:2] == (7, 5)
    list(client.chat.completions.create(model="gpt-c", messages=MESSAGES, stream=True))
    unknown = row_for(gateway.cli, 1, model="gpt-c")
    assert tokens(unknown) == (None, None, None, None) and unknown["requests"] == 1


def test_responses_and_embeddings_usage(gateway: Broker) -> None:
    """Responses (plain and streamed: response.completed) and embeddings are counted."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    client.responses.create(model="resp-a", input="hi")
    with client.responses.stream(model="resp-b", input="hi") as events:
        events.get_final_response()
    client.embeddings.create(model="emb-a", input=["a", "b"])
    for model in ("resp-a", "resp-b"):
        assert tokens(row_for(gateway.cli, 1, model=model)) == (7, 5, 2, 1)
    assert row_for(gateway.cli, 1, model="emb-a")["input_tokens"] == 7


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_gemini_usage_model_from_the_path(gateway: Broker, version: str) -> None:
    """Gemini usageMetadata is read from the last streamed chunk; the model is the path's."""
    client = genai_client(gateway.root("google"), gateway.daemon.token, api_version=version)
    list(client.models.generate_content_stream(model="gemini-x", contents="hi"))
    client.models.generate_content(model="gemini-x", contents="hi")
    for method in ("streamGenerateContent", "generateContent"):
        row = row_for(gateway.cli, 1, route=f"{version}/models/{{model}}:{method}")
        assert row["model"] == "gemini-x" and tokens(row) == (7, 5, 2, 1)


def test_voyage_and_jina_total_tokens(gateway: Broker) -> None:
    """Voyage and Jina report total_tokens, recorded as input tokens."""
    voyage_client(gateway.root("voyage"), gateway.daemon.token).embed(
        ["a"], model="voyage-3")
    jina_post(gateway.root("jina"), gateway.daemon.token, "v1/embeddings",
              {"model": "jina-v3", "input": ["a"]})
    assert row_for(gateway.cli, 1, provider="voyage")["input_tokens"] is not None
    assert row_for(gateway.cli, 1, provider="jina", model="jina-v3")["output_tokens"] == 0


def test_failed_requests_are_counted_as_errors(gateway: Broker) -> None:
    """A denied request still counts: one request, one error, tokens unknown."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token,
                           default_headers={"X-Broker-Consumer": "stranger"})
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="denied-model", input="a")
    row = row_for(gateway.cli, 1, consumer="stranger")
    assert (row["requests"], row["errors"], row["input_tokens"]) == (1, 1, None)


def test_no_usage_says_so(cli: Cli) -> None:
    """An empty table comes with a line on stderr saying nothing was recorded."""
    for args, said in ((("usage",), "yet"), (("usage", "--since", "7d"), "since 7d")):
        proc = cli(*args)
        assert proc.returncode == 0 and proc.stdout.split()[0] == "CONSUMER"
        assert proc.stderr.strip() == f"no proxied requests recorded {said}"


def test_usage_grouping_cli_admin_and_consumer_views(gateway: Broker) -> None:
    """`usage --by`, the admin route and a consumer's /v1/usage agree; a consumer sees its own."""
    client = openai_client(gateway.root("openai"), gateway.daemon.token)
    for model in ("m1", "m2"):
        client.embeddings.create(model=model, input="a")
    row_for(gateway.cli, 1, model="m2")
    by_provider = usage_rows(gateway.cli, "--by", "provider")
    assert [(r["provider"], r["requests"], r["model"]) for r in by_provider] == \
        [("openai", 2, None)]
    owner = gateway.daemon.client()
    admin = owner.request("GET", "/v1/admin/usage?group_by=consumer,provider")["usage"]
    assert admin[0]["requests"] == 2 and admin[0]["consumer"] == "default"
    token = json.loads(gateway.cli.ok("token", "create", "--consumer", "other", "--json"))
    mine = BrokerClient(url=gateway.daemon.url, token=token["token"]).request("GET", "/v1/usage")
    assert mine == {"usage": []}
    assert "REQUESTS" in gateway.cli.ok("usage", "--since", "1d")


async def test_budget_holds_under_twenty_concurrent_requests(gateway: Broker) -> None:
    """20 concurrent requests cannot overshoot a daily budget by more than one request."""
    results = await race_a_budget(gateway)
    per_request = 7 + 5
    spent = sum(results) * per_request
    assert 0 < sum(results) < 20
    assert spent <= 100 + per_request
    assert len(gateway.standins["openai"].requests) == sum(results)


def test_configured_provider_with_a_bad_table_is_refused_at_start(cli: Cli) -> None:
    """A [providers.NAME] table with a bad key stops `serve`, naming the key."""
    (cli.home / "config.toml").write_text(
        '[store]\nbackend = "file-vault"\n[providers.mine]\nbase_url = "http://127.0.0.1:9"\n'
        'error_shape = "xml"\n')
    proc = cli("serve", "--listen", "127.0.0.1:0")
    assert proc.returncode == 1 and "error_shape" in proc.stderr and "mine" in proc.stderr
    (cli.home / "config.toml").write_text(
        '[store]\nbackend = "file-vault"\n[providers.mine]\nsecret_ref = "x"\n')
    proc = cli("serve", "--listen", "127.0.0.1:0")
    assert proc.returncode == 1 and "base_url" in proc.stderr


def test_openai_compatible_server_by_base_url_only(cli: Cli,
                                                   standins: dict[str, StandIn]) -> None:
    """A table holding only base_url and secret_ref makes an OpenAI-compatible provider."""
    stand = standins["openai"]
    cli.add("@local_llm_key", real_key("openai"), provider="local-llm")
    configure(cli, {})
    with (cli.home / "config.toml").open("a") as config:
        config.write(f'[providers.local-llm]\nbase_url = "{stand.base_url}"\n'
                     'secret_ref = "local_llm_key"\n')
    write_grants(cli.home, grant("local_llm_key", purposes='"llm.chat"',
                                 delivery='"http_header_inject"', hosts=f'"{stand.host}"', ttl=60))
    d = start_daemon(cli.home, cli.env)
    try:
        client = openai_client(f"{d.url}/proxy/local-llm", d.token)
        answer = client.chat.completions.create(model="llama", messages=MESSAGES)
        assert answer.choices[0].message.content == stand.expected_text
        assert stand.last.headers["authorization"] == f"Bearer {real_key('openai')}"
        assert tokens(row_for(cli, 1, provider="local-llm"))[:2] == (7, 5)
    finally:
        d.stop()


@pytest.fixture
def more(cli: Cli) -> Any:
    """A broker in front of Anthropic, Azure OpenAI and OpenRouter stand-ins."""
    names = ("anthropic", "azure-openai", "openrouter")
    stands = {p: StandIn(p, real_key(p), path_prefix="/api" if p == "openrouter" else "").start()
              for p in names}
    for p in names:
        cli.add(f"@{p.replace('-', '_')}_key", real_key(p), provider=p)
    configure(cli, stands)
    with (cli.home / "secrets.grants.toml").open() as grants:
        text = grants.read()
    (cli.home / "secrets.grants.toml").write_text(text.replace("-openai_api_key", "_openai_key")
                                                  .replace("anthropic_api_key", "anthropic_key")
                                                  .replace("openrouter_api_key", "openrouter_key"))
    d = start_daemon(cli.home, cli.env)
    yield Broker(cli, d, stands)
    d.stop()
    for s in stands.values():
        s.stop()


def test_anthropic_create_and_stream(more: Broker) -> None:
    """The anthropic SDK through the broker: x-api-key upstream, usage from both events."""
    from tests.support.sdk_clients import anthropic_client

    client = anthropic_client(more.root("anthropic"), more.daemon.token)
    stand = more.standins["anthropic"]
    message = client.messages.create(model="claude-a", max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == stand.expected_text
    with client.messages.stream(model="claude-b", max_tokens=50, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == stand.expected_text
    assert stand.last.headers["x-api-key"] == stand.expected_key
    assert "authorization" not in stand.last.headers
    more.assert_only_real_key_upstream("anthropic")
    for model in ("claude-a", "claude-b"):
        assert tokens(row_for(more.cli, 1, model=model))[:3] == (7, 5, 2)


def test_anthropic_denial_is_its_permission_error(more: Broker) -> None:
    """A denial reaches the anthropic SDK as PermissionDeniedError in Anthropic's shape."""
    import anthropic

    from tests.support.sdk_clients import anthropic_client

    client = anthropic_client(more.root("anthropic"), more.daemon.token,
                              default_headers={"X-Broker-Consumer": "nobody"})
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(model="c", max_tokens=5, messages=MESSAGES)


def test_azure_openai_deployment_and_api_version(more: Broker) -> None:
    """AzureOpenAI's api-key header is swapped; the deployment is the model."""
    from tests.support.sdk_clients import azure_client

    client = azure_client(more.root("azure-openai"), more.daemon.token)
    stand = more.standins["azure-openai"]
    answer = client.chat.completions.create(model="my-deploy", messages=MESSAGES)
    assert answer.choices[0].message.content == stand.expected_text
    assert stand.last.headers["api-key"] == stand.expected_key
    assert "api-version=" in stand.last.query
    list(client.chat.completions.create(model="my-deploy", messages=MESSAGES, stream=True,
                                        stream_options={"include_usage": True}))
    more.assert_only_real_key_upstream("azure-openai")
    row = row_for(more.cli, 2, provider="azure-openai", model="my-deploy")
    assert tokens(row)[:2] == (14, 10)


def test_openrouter_stream_keeps_comment_lines(more: Broker) -> None:
    """OpenRouter's SSE comment lines pass through untouched; usage is still read."""
    stand = more.standins["openrouter"]
    status, headers, body = jina_post(
        more.root("openrouter"), more.daemon.token, "v1/chat/completions",
        {"model": "or-a", "messages": MESSAGES, "stream": True,
         "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.count(b": OPENROUTER PROCESSING") >= stand.n_chunks
    client = openai_client(more.root("openrouter"), more.daemon.token, provider="openrouter")
    streamed = client.chat.completions.create(model="or-b", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) \
        == stand.expected_text
    assert tokens(row_for(more.cli, 1, provider="openrouter", model="or-a"))[:2] == (7, 5)
    more.assert_only_real_key_upstream("openrouter")
