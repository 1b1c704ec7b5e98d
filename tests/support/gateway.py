"""A broker in front of one stand-in upstream per provider, as the gateway tests use it."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tests.conftest import Cli, Daemon, write_grants
from tests.support.standins import StandIn

PROVIDERS = ("openai", "google", "jina", "voyage")
PURPOSES = '"llm.chat", "llm.embeddings", "llm.rerank"'
JINA_BODY = {"model": "jina-embeddings-v3", "input": ["a"]}


_RUN = uuid.uuid4().hex[:12]


def real_key(provider: str) -> str:
    """The provider key the stand-in expects: a canary that must never leave the broker."""
    return f"real-{provider}-key-{_RUN}-canary"


@dataclass
class Gateway:
    cli: Cli
    daemon: Daemon
    standins: dict[str, StandIn]

    def root(self, provider: str) -> str:
        return f"{self.daemon.url}/proxy/{provider}"

    def assert_only_real_key_upstream(self, provider: str, *tokens: str) -> None:
        """Every upstream request carried the real key and none of the broker tokens."""
        stand = self.standins[provider]
        assert stand.requests, "upstream saw no request"
        for rec in stand.requests:
            sent = json.dumps(rec.headers) + rec.query + rec.body.decode(errors="replace")
            assert real_key(provider) in sent
            for token in (self.daemon.token, *tokens):
                assert token not in sent

    def audit(self, event: str) -> list[dict[str, Any]]:
        return list(json.loads(self.cli.ok("audit", "--event", event, "--json"))["events"])


def configure(cli: Cli, standins: dict[str, StandIn], *, extra: str = "",
              base_urls: dict[str, str] | None = None) -> None:
    urls = {p: s.base_url for p, s in standins.items()} | (base_urls or {})
    config = "".join(f'[providers.{p}]\nbase_url = "{u}"\n\n' for p, u in urls.items())
    (cli.home / "config.toml").write_text('[store]\nbackend = "file-vault"\n' + extra + "\n"
                                          + config)
    write_grants(cli.home, "".join(
        f'[[grants]]\nsecret_ref = "{p}_api_key"\nconsumer = "default"\npurposes = [{PURPOSES}]\n'
        f'delivery = ["http_header_inject"]\nallowed_hosts = ["{s.host}"]\nttl_secs = 300\n\n'
        for p, s in standins.items()))


