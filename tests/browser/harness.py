"""What the dashboard tests and scripts/screenshots.py share: Chromium as they launch it, a
demo home (fake keys, grants, a token, a lease, usage), and signing in with a login code.

Chromium is Debian's (`/usr/bin/chromium`), driven by Python playwright; `playwright
install` (which downloads browsers) is never needed.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, Page, sync_playwright

from broker.client import BrokerClient
from broker.gateway.usage import UsageRow
from broker.store.metadata import Metadata
from tests.conftest import Cli, Daemon, grant, write_grants
from tests.support.gateway import add_secrets

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def seed(cli: Cli, keys: dict[str, tuple[str, str]]) -> None:
    """Store `ref -> (provider, value)`, grant each to ugent-core (native and injected), and
    give the usage table a few days of traffic, as if the gateway had served it."""
    add_secrets(cli, keys)
    hosts = {"openai": "api.openai.com", "google": "generativelanguage.googleapis.com",
             "jina": "api.jina.ai", "voyage": "api.voyageai.com"}
    write_grants(cli.home, "".join(
        grant(ref, consumer="ugent-core", hosts=f'"{hosts.get(provider, provider)}"')
        for ref, (provider, _value) in keys.items()))
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    traffic = [("ugent-core", "openai", "gpt-4o-mini", "v1/chat/completions", 182, 3, 61_000,
                14_500), ("ugent-core", "google", "gemini-2.0-flash", "v1beta/models",
                          64, 1, 22_000, 6_100),
               ("context-engine", "jina", "jina-embeddings-v3", "v1/embeddings", 240, 0,
                48_000, None),
               ("context-engine", "voyage", "rerank-2", "v1/rerank", 95, 2, 30_500, None)]
    metadata = Metadata(cli.home / "metadata.db")
    try:
        metadata.add_usage([UsageRow(c, p, m, r, today, n, e, i, o)
                            for c, p, m, r, n, e, i, o in traffic], {})
    finally:
        metadata.close()


def owner(daemon: Daemon) -> BrokerClient:
    """The owner's client, over the Unix socket."""
    return daemon.client(unix=True)


def login_url(daemon: Daemon) -> str:
    """A fresh one-time login link, as `secret-broker ui --print` prints it."""
    return str(owner(daemon).request("POST", "/v1/admin/ui/code")["url"])


def explain(page: Page, fields: dict[str, str]) -> None:
    """Fill the grants page's explain form (label -> text) and submit it."""
    form = page.locator("#explain-form")
    for label, text in fields.items():
        form.get_by_label(label).fill(text)
    form.get_by_role("button", name="Explain").click()


def sign_in(page: Page, url: str) -> None:
    """Open the link and wait until the secrets are on screen."""
    page.goto(url)
    page.get_by_role("tab", name="Secrets", selected=True).wait_for()
    page.locator("#secrets-table tbody tr").first.wait_for()
