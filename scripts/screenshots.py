"""Screenshots of each dashboard page, for docs/dashboard.md.

    .venv/bin/python scripts/screenshots.py            # writes docs/screenshots/*.png

It makes a throwaway demo home (fake keys, grants, two consumer tokens, two leases, a few
days of usage), starts the broker on a free loopback port, signs in with a one-time code
and photographs each tab in the same headless Chromium the browser tests use
(tests/browser/harness.py). Everything it started is stopped and removed at the end.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the demo home is set up with the test harness

from playwright.sync_api import Page  # noqa: E402 - after the path above

from tests.browser.harness import (  # noqa: E402
    chromium,
    explain,
    login_url,
    owner,
    seed,
    sign_in,
)
from tests.conftest import Cli, base_env, start_daemon  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
DEMO_KEYS = {f"{p}_api_key": (p, f"demo-{p}-{secrets.token_hex(16)}")
             for p in ("openai", "google", "jina", "voyage")}


def save(page: Page, ready: str, name: str) -> None:
    """Once `ready` shows, a full-page screenshot to docs/screenshots/NAME.png."""
    page.locator(ready).first.wait_for()
    page.screenshot(path=OUT / f"{name}.png", full_page=True)
    print(f"wrote {OUT / f'{name}.png'}")


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="sb-demo-", dir="/tmp"))
    cli = Cli(root / "h", base_env(root / "h"))
    cli.ok("init", "--backend", "file-vault")
    seed(cli, DEMO_KEYS)
    daemon = start_daemon(cli.home, cli.env)
    try:
        client = owner(daemon)
        for consumer, description in (("ugent-core", "the agent runtime"),
                                      ("context-engine", "embeddings and rerank")):
            client.request("POST", "/v1/admin/tokens",
                           {"consumer": consumer, "description": description, "ttl": "30d"})
        for ref in ("openai_api_key", "jina_api_key"):
            client.lease(ref, "llm.embeddings", consumer="ugent-core")
        OUT.mkdir(parents=True, exist_ok=True)
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            sign_in(page, login_url(daemon))
            save(page, "#secrets-table td.actions", "secrets")
            page.get_by_role("tab", name="Grants").click()
            explain(page, {"Consumer": "ugent-core", "Secret": "openai_api_key",
                           "Purpose": "llm.chat", "Host": "api.openai.com"})
            save(page, "#explain-result.ok", "grants")
            for tab, ready in (("Leases", "#leases-table td.actions"),
                               ("Tokens", "#tokens-table td.actions"),
                               ("Audit", "#audit-verify.ok"),
                               ("Usage", "#usage-chart rect.bar")):
                page.get_by_role("tab", name=tab).click()
                save(page, ready, tab.lower())
            narrow = browser.new_page(viewport={"width": 390, "height": 844})
            sign_in(narrow, login_url(daemon))
            save(narrow, "#secrets-table td.actions", "narrow")
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
