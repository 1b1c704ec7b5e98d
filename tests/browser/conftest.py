"""Fixtures for the dashboard tests: one broker and one Chromium per module, a fresh browser
context per test that records everything the pages saw (for the canary scans)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Error, Page, Response

from tests.browser.harness import chromium, login_url, seed, sign_in
from tests.conftest import CANARY, Cli, Daemon, scan, start_daemon

KEYS = {"openai_api_key": ("openai", f"{CANARY}-openai"),
        "jina_api_key": ("jina", f"{CANARY}-jina")}


@dataclass
class Site:
    """The module's broker: a demo home holding canary keys, and its daemon."""

    cli: Cli
    daemon: Daemon

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = (self.cli.home / "audit.log").read_bytes().splitlines()
        return [e for e in map(json.loads, lines) if event is None or e["event"] == event]


@dataclass
class Watched:
    """A browser context and everything its pages received, logged or kept."""

    context: BrowserContext
    bodies: list[bytes] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in a page

    def page(self) -> Page:
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        return page

    def signed_in(self, site: Site) -> Page:
        page = self.page()
        sign_in(page, login_url(site.daemon))
        return page

    def kept(self) -> list[str]:
        """What the pages hold now: DOM, input values, sessionStorage, localStorage, cookies."""
        held = [json.dumps(self.context.storage_state())]
        for page in self.context.pages:
            held.append(page.content())
            held.append(page.evaluate("""() => JSON.stringify([
                [...document.querySelectorAll("input, select")].map((e) => e.value),
                Object.entries(sessionStorage), Object.entries(localStorage)])"""))
        return held

    def leaks(self, *needles: str) -> list[str]:
        seen = [b.decode(errors="replace") for b in self.bodies] + self.console + self.kept()
        return scan(seen, *needles)

    def record(self, response: Response) -> None:
        try:
            self.bodies.append(response.body())
        except Error:  # a body the browser never kept (a refused cross-origin answer)
            return

    def log(self, message: ConsoleMessage) -> None:
        self.console.append(message.text)


@pytest.fixture(scope="module")
def site(module_home: Cli) -> Iterator[Site]:
    """The module's home holding the canary keys, and its daemon."""
    seed(module_home, KEYS)
    daemon = start_daemon(module_home.home, module_home.env)
    yield Site(module_home, daemon)
    daemon.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context()
    seen = Watched(context)
    context.on("response", seen.record)
    context.on("console", seen.log)
    yield seen
    context.close()
