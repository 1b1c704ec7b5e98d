"""Leak canaries: a whole session with canary keys and tokens, then a scan of every place a
value or token could end up. Plus the passphrase: `start` hands it over a pipe, and
neither the daemon's environment nor an `exec` child ever holds it.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from broker.client import BrokerClient
from tests.conftest import CANARY, Cli, base_env, grant, scan
from tests.support.gateway import EMBED, Broker, exchange, launch, provider_grants, real_key
from tests.support.sdk_clients import genai_client, jina_post, openai_client, voyage_client
from tests.support.standins import StandIn

NATIVE = b'{"secret_ref": "openai_api_key", "purpose": "llm.chat", "delivery": "native"}'


def home_files(home: Path) -> dict[str, bytes]:
    """Every regular file in the home except `broker.token` (the one place the token lives)."""
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != "broker.token"}


def hostile_session(b: Broker, wrong: str) -> list[tuple[bytes, bytes]]:
    """Attacks carrying the owner token or a canary wrong token; returns (sent, received)
    for the malformed requests that aiohttp's parser refuses before the broker sees them."""
    for target in ("/proxy/openai/v1/../v1/chat/completions", "/proxy/openai/v1/models",
                   "/proxy/nope/v1/x"):
        assert b.http("POST", target, body=EMBED).status == 404
    assert b.http("GET", "/proxy/openai/v1/embeddings").status == 405
    assert b.http("GET", "/v1/health", token=wrong).status == 401
    assert b.post("openai", "v1/embeddings", token=wrong).status == 401
    assert b.http("GET", "/v1/health", headers=[("Host", "evil.example")]).status == 403
    assert b.http("GET", "/v1/health", headers=[("Origin", "http://evil.example")]).status == 403
    assert b.post("openai", "v1/embeddings", headers=[("X-Broker-Consumer", "nobody")]
                  ).status == 403
    assert b.http("POST", "/v1/leases", body=b"[" * 5000).status == 400
    assert b.post("openai", "v1/embeddings?key=" + b.token).status == 200
    malformed = [
        f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {b.token}\x00"
        "\r\n\r\n",
        f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n Authorization: Bearer {b.token}\r\n\r\n",
        f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {wrong}"
        f"{'a' * 9000}\r\n\r\n",
        f"GET /v1/health HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {b.token}\n\n",
    ]
    return [(m.encode(), exchange(b.port, m.encode())) for m in malformed]


def test_a_canary_session_leaves_no_trace(cli: Cli, standins: dict[str, StandIn]) -> None:
    """No key or token of a hostile session is in any log, output, body, /proc file or home file."""
    openai = standins["openai"]
    native = grant("openai_api_key", purposes='"llm.chat"', delivery='"native"',
                   hosts=f'"{openai.host}"', ttl=60)
    b = launch(cli, standins, grants=provider_grants(standins) + native)
    wrong = "sbt_" + uuid.uuid4().hex  # a guess is a secret too: it may be a real token's typo
    old_token = b.token
    try:
        client = openai_client(f"{b.daemon.url}/proxy/openai", b.token)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        stream = client.chat.completions.create(model="m", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        genai = genai_client(f"{b.daemon.url}/proxy/google", b.token)
        assert genai.models.generate_content(model="gemini-2.0-flash", contents="hi").text
        voyage_client(f"{b.daemon.url}/proxy/voyage", b.token).embed(["a"], model="voyage-3")
        assert jina_post(f"{b.daemon.url}/proxy/jina", b.token, "v1/embeddings",
                         {"model": "m", "input": ["a"]})[0] == 200
        owner = BrokerClient(socket_path=cli.home / "run" / "broker.sock")
        agent = owner.request("POST", "/v1/admin/tokens", {"consumer": "agent"})["token"]
        assert b.post("openai", "v1/embeddings", token=agent).status == 403
        echoes = hostile_session(b, wrong)
        lease = b.http("POST", "/v1/leases", body=NATIVE)
        assert lease.status == 201 and lease.json()["value"] == real_key("openai")
        granted = b.replies.pop()  # the one answer allowed to hold a value
        environ = Path(f"/proc/{b.daemon.proc.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{b.daemon.proc.pid}/cmdline").read_bytes()
        for args in (("list",), ("list", "--json"), ("inspect", "@openai_api_key", "--json"),
                     ("audit",), ("audit", "--json"), ("audit", "verify"), ("status", "--json"),
                     ("grants", "check"), ("exec", "--env", "K=@openai_api_key", "--", "true"),
                     ("token", "rotate"), ("audit", "@openai_api_key")):
            cli.ok(*args)
        new_token = (cli.home / "broker.token").read_text().strip()
        assert b.http("GET", "/v1/health", token=new_token).status == 200
    finally:
        b.stop()
    needles = (CANARY, old_token, new_token, agent, wrong)
    # Positive controls: the canaries are real, and did travel where they should.
    assert CANARY in granted.body.decode()
    for provider, stand in standins.items():
        assert real_key(provider) in json.dumps([r.headers for r in stand.requests])
    places = {
        "daemon log": b.log(),
        "audit log": (cli.home / "audit.log").read_text(),
        "cli output": "\n".join(cli.outputs),
        "error bodies": "\n".join(r.raw.decode("latin-1") for r in b.replies),
        "environ": environ.decode("latin-1"),
        "cmdline": cmdline.decode("latin-1"),
        **{f"home/{name}": data.decode("latin-1") for name, data in home_files(cli.home).items()},
    }
    leaks = {where: found for where, text in places.items() if (found := scan(text, *needles))}
    assert leaks == {}
    # aiohttp's own 400 for an unparseable request quotes the bad line back to the same
    # connection: it may hold only what that very request sent, and is logged nowhere.
    for sent, received in echoes:
        assert received.startswith(b"HTTP/1.") and b" 400 " in received.split(b"\r\n")[0]
        for needle in needles:
            assert needle.encode() not in received or needle.encode() in sent


def test_start_hands_the_passphrase_over_a_pipe_and_exec_never_passes_it_on(home: Path) -> None:
    """`start` pipes the passphrase: not in the daemon's environ or cmdline, nor exec children."""
    passphrase = "pp-canary-" + uuid.uuid4().hex
    c = Cli(home, base_env(home, SECRET_BROKER_PASSPHRASE=passphrase))
    c.ok("init", "--backend", "file-vault")
    assert "passphrase" in json.loads((home / "vault" / "header.json").read_text())["unlock"]
    c.add("@openai_api_key", CANARY)
    c.ok("start", "--listen", "127.0.0.1:0")
    try:
        pid = int((home / "run" / "broker.pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert passphrase.encode() not in environ + cmdline
        assert b"SECRET_BROKER_PASSPHRASE=" not in environ
        assert b"SECRET_BROKER_PASSPHRASE_FILE=/dev/fd/" in environ  # it came over a pipe
        assert json.loads(c.ok("status", "--json"))["backend"] == "file-vault"
        before = len(c.outputs)
        child = c.ok("exec", "--env", "K=@openai_api_key", "--", sys.executable, "-c",
                     "import json, os; print(json.dumps(dict(os.environ)))")
        child_env = json.loads(child)
        assert child_env["K"] == CANARY
        assert "SECRET_BROKER_PASSPHRASE" not in child_env and passphrase not in child
        del c.outputs[before]  # the child's own output holds K, by design
    finally:
        c("stop")
    texts = [*c.outputs, (home / "run" / "broker.log").read_text(),
             (home / "audit.log").read_text()]
    assert scan(texts, passphrase, CANARY) == []
