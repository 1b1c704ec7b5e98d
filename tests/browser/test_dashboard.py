"""The dashboard in a real headless Chromium: signing in, every page, and another local page
(on another loopback port, in the same browser) trying to use the owner's session."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from broker.client import BrokerClient
from broker.core.errors import Unauthorized
from broker.core.home import Home
from broker.server.middlewares import HEADERS
from broker.service.context import Context
from broker.service.secrets import Secrets
from tests.browser.conftest import Site, Watched
from tests.browser.harness import explain, owner
from tests.conftest import CANARY, CANARY_2, Cli, wait_for
from tests.support.gateway import Reply, exchange, parse, request_bytes

# One Chromium and one daemon serve the whole module: xdist keeps it on one worker.
pytestmark = pytest.mark.xdist_group("browser")


def http(site: Site, method: str, target: str, *headers: tuple[str, str],
         token: str | None = None, body: Any = None) -> Reply:
    """One request over TCP with exactly these headers (a loopback Host with the port)."""
    sent = list(headers)
    if token is not None:
        sent.append(("Authorization", f"Bearer {token}"))
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        sent.append(("Content-Type", "application/json"))
    port = site.daemon.port
    return parse(exchange(port, request_bytes(port, method, target, sent, data)))


def session(site: Site) -> str:
    """A dashboard session token, obtained as the page obtains one."""
    code = owner(site.daemon).request("POST", "/v1/admin/ui/code")["code"]
    reply = http(site, "POST", "/ui/api/session", body={"code": code})
    assert reply.status == 200, reply.body
    return str(reply.json()["token"])


def refs(site: Site) -> list[str]:
    return [s["ref"] for s in owner(site.daemon).request("GET", "/v1/admin/secrets")["secrets"]]


def by_admin(site: Site, event: str, **fields: str) -> list[dict[str, Any]]:
    return [e for e in site.events(event) if e["actor"] == "admin"
            and all(e.get(k) == v for k, v in fields.items())]


def test_login_link_works_once(site: Site, watched: Watched) -> None:
    """`ui --print` gives a link that signs in once; used again, in any tab, it fails."""
    url = site.cli.ok("ui", "--print").strip()
    base = f"http://127.0.0.1:{site.daemon.port}/ui/"
    assert re.fullmatch(re.escape(base) + r"#code=[A-Za-z0-9_-]{43}", url)
    page = watched.page()
    page.goto(url)
    expect(page.locator("#secrets-table")).to_contain_text("@openai_api_key")
    expect(page.locator("#secrets-table")).to_contain_text("@jina_api_key")
    assert page.url == base  # the code left the address bar and the history
    assert page.evaluate("sessionStorage.getItem('secret-broker.session')").startswith("sbs_")
    again = watched.page()  # another tab: its own, empty sessionStorage
    again.goto(url)
    expect(again.locator("#signed-out-reason")).to_have_text(
        "That login link was already used, or has expired.")
    expect(again.get_by_role("tab", name="Secrets")).to_be_hidden()
    reply = http(site, "POST", "/ui/api/session", body={"code": url.split("#code=")[1]})
    assert (reply.status, reply.code) == (401, "unauthorized")
    assert len(site.events("ui.session_started")) >= 1
    # Both refusals are audited: the first of the window at once, the rest counted (written
    # as one line with `count` when the window closes).
    failed = [e for e in site.events("auth.failed") if e.get("reason") == "login_code"]
    assert len(failed) >= 1 and {e["status"] for e in failed} == {401}
    assert watched.context.cookies() == []
    assert watched.errors == []
    assert watched.leaks(CANARY, url.split("#code=")[1]) == []


def test_ui_opens_a_private_page_that_signs_in(site: Site, watched: Watched,
                                               tmp_path: Path) -> None:
    """`ui` hands the browser a file: page, not the link; Chromium follows it (a
    cross-site navigation) to the dashboard, which lets it in and signs in with the code."""
    browser = tmp_path / "browser"
    browser.write_text('#!/bin/sh\nprintf %s "$1" > "$0.opened"\n')
    browser.chmod(0o700)
    site.cli.ok("ui", env={"BROWSER": str(browser), "DISPLAY": ":99"})
    target = (tmp_path / "browser.opened").read_text()
    assert target.startswith("file://") and "code" not in target
    page = watched.page()
    page.goto(target)
    expect(page.locator("#secrets-table")).to_contain_text("@openai_api_key")
    assert page.url == f"http://127.0.0.1:{site.daemon.port}/ui/"
    assert watched.errors == []


def test_ui_needs_the_running_broker(cli: Cli) -> None:
    """With no daemon there is no code to mint: exit 6, and the way to start it."""
    proc = cli("ui", "--print")
    assert proc.returncode == 6
    assert "secret-broker start" in proc.stderr and proc.stdout == ""


def test_add_rotate_and_remove_through_the_forms(site: Site, watched: Watched) -> None:
    """A typed value is sent once and never shown, kept, stored or logged by the page."""
    page = watched.signed_in(site)
    first, second = f"{CANARY}-typed", f"{CANARY_2}-rotated"
    add = page.locator("#add-form")
    add.get_by_label("Ref").fill("@typed_key")
    add.get_by_label("Provider").fill("voyage")
    add.get_by_label("Value").fill(first)
    add.get_by_role("button", name="Add").click()
    expect(page.locator("#notice")).to_have_text("Added @typed_key (version 1).")
    expect(add.get_by_label("Value")).to_have_value("")
    row = page.locator("#secrets-table tbody tr", has_text="@typed_key")
    expect(row.locator("td").nth(1)).to_have_text("voyage")
    fingerprint = row.locator("td").nth(4).text_content()

    row.get_by_role("button", name="Rotate @typed_key").click()
    value = page.locator("#rotate-form").get_by_label("New value")
    expect(value).to_be_focused()
    page.keyboard.type(second)  # the keyboard alone: type, then Enter submits
    page.keyboard.press("Enter")
    expect(page.locator("#notice")).to_contain_text("Rotated @typed_key: now version 2")
    expect(value).to_have_value("")
    expect(row.locator("td").nth(5)).to_have_text("2")
    expect(row.locator("td").nth(4)).not_to_have_text(fingerprint or "")
    ctx = Context.open(Home(site.cli.home), site.cli.env)
    try:
        assert Secrets(ctx).value("typed_key") == second
    finally:
        ctx.metadata.close()

    row.get_by_role("button", name="Remove @typed_key").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Remove @typed_key?")
    page.keyboard.press("Escape")  # cancel: nothing happens
    expect(dialog).to_be_hidden()
    expect(row).to_have_count(1)
    row.get_by_role("button", name="Remove @typed_key").click()
    dialog.get_by_role("button", name="Remove").click()
    expect(page.locator("#notice")).to_have_text("Removed @typed_key.")
    expect(row).to_have_count(0)
    assert "typed_key" not in refs(site)
    for event in ("secret.added", "secret.rotated", "secret.removed"):
        assert len(by_admin(site, event, secret_ref="typed_key")) == 1, event
    assert watched.errors == []
    assert watched.leaks(CANARY, CANARY_2) == []
    assert site.daemon.proc.poll() is None
    assert not [n for n in (CANARY, CANARY_2)
                if n in site.daemon.log() or n in (site.cli.home / "audit.log").read_text()]


def test_revoke_a_lease_and_a_token(site: Site, watched: Watched) -> None:
    """Leases and consumer tokens end from their pages; a new token is shown once."""
    client = owner(site.daemon)
    lease_id = client.lease("jina_api_key", "llm.embeddings", consumer="ugent-core")["lease_id"]
    made = client.request("POST", "/v1/admin/tokens",
                          {"consumer": "ugent-core", "description": "to revoke"})
    page = watched.signed_in(site)

    page.get_by_role("tab", name="Leases").click()
    expect(page.locator("#leases-table")).to_contain_text(lease_id)
    page.get_by_role("button", name=f"Revoke {lease_id}").click()
    expect(page.locator("#notice")).to_have_text(f"Revoked lease {lease_id}.")
    expect(page.locator("#leases-table")).not_to_contain_text(lease_id)
    assert lease_id not in [lease["lease_id"] for lease in client.leases()]

    page.get_by_role("tab", name="Tokens").click()
    form = page.locator("#token-form")
    form.get_by_label("Consumer").fill("context-engine")
    form.get_by_label("Description").fill("made in the dashboard")
    form.get_by_role("button", name="Create").click()
    shown = page.locator("#new-token-value")
    expect(shown).to_have_text(re.compile(r"^sbc_[A-Za-z0-9_-]{43}$"))
    new_token = shown.text_content() or ""
    page.get_by_role("button", name="Done").click()
    expect(page.locator("#new-token")).to_be_hidden()
    assert new_token not in page.content()
    assert BrokerClient(url=site.daemon.url, token=new_token).leases() == []

    page.get_by_role("button", name=f"Revoke {made['id']}").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    expect(page.locator("#notice")).to_have_text(f"Revoked {made['id']}.")
    expect(page.get_by_role("button", name=f"Revoke {made['id']}")).to_have_count(0)
    with pytest.raises(Unauthorized):
        BrokerClient(url=site.daemon.url, token=made["token"]).leases()
    assert [e["reason"] for e in site.events("lease.revoked")
            if e.get("lease_id") == lease_id] == ["revoked by request"]
    assert len(by_admin(site, "token.revoked", token_id=made["id"])) == 1
    assert len(by_admin(site, "token.created", consumer="context-engine")) == 1
    assert watched.errors == []
    assert watched.leaks(CANARY, made["token"]) == []


def test_grants_audit_and_usage_pages(site: Site, watched: Watched) -> None:
    """The grants file and an explain, the audit trail with its verdict, the usage chart."""
    page = watched.signed_in(site)
    page.get_by_role("tab", name="Secrets").focus()
    page.keyboard.press("ArrowRight")  # tabs work from the keyboard too
    expect(page.get_by_role("tab", name="Grants")).to_be_focused()
    expect(page.get_by_role("tab", name="Grants", selected=True)).to_be_visible()
    expect(page.locator("#grants-file")).to_contain_text("valid")
    expect(page.locator("#grants-table tbody tr")).to_have_count(2)
    explain(page, {"Consumer": "ugent-core", "Secret": "@openai_api_key", "Purpose": "llm.chat",
                   "Host": "api.openai.com"})
    expect(page.locator("#explain-result")).to_have_text(
        "allow: grant 0 (line 1) allows it for 300 s")
    explain(page, {"Consumer": "stranger"})
    expect(page.locator("#explain-result")).to_have_text(re.compile(r"^deny: .*stranger"))

    page.get_by_role("tab", name="Audit").click()
    expect(page.locator("#audit-verify")).to_have_text(
        re.compile(r"^Hash chain verified: \d+ lines, intact\.$"))
    audit = page.locator("#audit-form")
    audit.get_by_label("Event").fill("secret.added")
    audit.get_by_role("button", name="Show").click()
    events = page.locator("#audit-table tbody tr td:nth-child(3)")
    expect(events).to_have_text(["secret.added"] * len(site.events("secret.added")))
    audit.get_by_label("Event").fill("")
    audit.get_by_label("Ref").fill("@jina_api_key")
    audit.get_by_role("button", name="Show").click()
    secrets = page.locator("#audit-table tbody tr td:nth-child(5)")
    expect(secrets.first).to_have_text("@jina_api_key")
    # The first row may still be the unfiltered table's: poll until the filtered one is in.
    wait_for(lambda: set(secrets.all_text_contents()) == {"@jina_api_key"}, timeout=10,
             what="the audit table filtered to @jina_api_key")

    page.get_by_role("tab", name="Usage").click()
    chart = page.locator("#usage-chart svg")
    expect(chart.locator("rect.bar")).to_have_count(4)
    expect(chart.locator("text.label").first).to_have_text("context-engine · jina")
    expect(chart.locator("text.amount").first).to_have_text("240")
    page.locator("#usage-form").get_by_label("Measure").select_option("tokens")
    page.locator("#usage-form").get_by_role("button", name="Show").click()
    expect(chart.locator("text.label").first).to_have_text("ugent-core · openai")
    expect(chart.locator("text.amount").first).to_have_text("75,500")
    expect(page.locator("#usage-table tbody tr")).to_have_count(4)
    assert watched.errors == []
    assert watched.leaks(CANARY) == []


ATTACK = """<!doctype html><title>another local page</title>
<form id="form" method="post" enctype="text/plain" target="sink" action="{target}/ui/api/secrets">
<input name='{{"ref": "pwned", "provider": "openai", "kind": "api_key", "value": "x", "p": "'
 value='"}}'></form>
<iframe name="sink"></iframe>
<iframe src="{target}/ui/"></iframe>
<script>
const target = "{target}";
const secret = JSON.stringify({{ref: "pwned", provider: "openai", kind: "api_key", value: "x"}});
async function attempt(url, init) {{
  try {{
    const reply = await fetch(url, init);
    return reply.type === "opaque" ? "opaque" : `read ${{reply.status}}: ${{await reply.text()}}`;
  }} catch (error) {{
    return "blocked";
  }}
}}
(async () => {{
  const results = {{
    "cors-post": await attempt(`${{target}}/ui/api/secrets`, {{method: "POST", body: secret,
      headers: {{"Content-Type": "application/json"}}}}),
    "cors-get": await attempt(`${{target}}/ui/api/secrets`, {{}}),
    "cors-delete": await attempt(`${{target}}/ui/api/secrets/openai_api_key`, {{method: "DELETE"}}),
    "no-cors-post": await attempt(`${{target}}/ui/api/secrets`, {{method: "POST", mode: "no-cors",
      body: secret}}),
    "no-cors-login": await attempt(`${{target}}/ui/api/session`, {{method: "POST",
      mode: "no-cors", body: '{{"code": "guessed"}}'}}),
  }};
  document.getElementById("form").submit();
  window.results = results;
}})();
</script>"""


@contextmanager
def attacker(target: str) -> Iterator[str]:
    """Another local web server (another loopback port) serving the attack page."""
    page = ATTACK.format(target=target).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_another_local_page_is_refused_and_changes_nothing(site: Site, watched: Watched) -> None:
    """fetch (cors, no-cors), a form and a frame from another port: refused, audited, no change."""
    dashboard = watched.signed_in(site)  # the owner is signed in, in the same browser
    client = owner(site.daemon)
    before = client.request("GET", "/v1/admin/secrets"), client.request("GET", "/v1/admin/tokens")
    seen = len(site.events())
    with attacker(f"http://127.0.0.1:{site.daemon.port}") as url:
        evil: Page = watched.page()
        evil.goto(url)
        evil.wait_for_function("window.results !== undefined")
        results = evil.evaluate("window.results")
    # Not even an opaque answer: Cross-Origin-Resource-Policy blocks the no-cors replies too.
    assert results == dict.fromkeys(("cors-post", "cors-get", "cors-delete", "no-cors-post",
                                     "no-cors-login"), "blocked")
    expected = sorted(["/ui/api/secrets"] * 4 + ["/ui/api/secrets/openai_api_key",
                                                 "/ui/api/session", "/ui/"])

    def refused() -> list[dict[str, Any]]:
        return [e for e in site.events()[seen:] if e["event"] == "request.refused"]

    # The first refusal of the window is written at once, the rest are counted (and written
    # as one line with `count` when the window closes): one line, and nothing else happened.
    wait_for(refused, what="the attempts to be audited")
    assert next(e["route"] for e in refused()) in expected
    assert {(e["reason"], e["status"]) for e in refused()} == {("origin_not_allowed", 403)}
    assert [e["event"] for e in site.events()[seen:]] == ["request.refused"]
    after = client.request("GET", "/v1/admin/secrets"), client.request("GET", "/v1/admin/tokens")
    assert after == before
    dashboard.get_by_role("tab", name="Audit").click()  # the owner's tab still works
    expect(dashboard.locator("#audit-table tbody tr").first).to_contain_text("request.refused")
    assert watched.errors == []
    assert watched.leaks(CANARY) == []


def test_headers_and_which_token_works_where(site: Site) -> None:
    """Security headers on every /ui/ answer; a session works on /ui/api/ only, alone there."""
    token = session(site)
    consumer = owner(site.daemon).request("POST", "/v1/admin/tokens", {"consumer": "agent"})
    replies = {
        "page": http(site, "GET", "/ui/"),
        "script": http(site, "GET", "/ui/app.js"),
        "style": http(site, "GET", "/ui/style.css"),
        "api": http(site, "GET", "/ui/api/leases", token=token),
        "usage": http(site, "GET", "/ui/api/usage?group_by=consumer,provider", token=token),
        "missing": http(site, "GET", "/ui/nothing-here"),
        "refused": http(site, "GET", "/ui/api/secrets", ("Origin", "http://127.0.0.1:1"),
                        token=token),
        "no token": http(site, "GET", "/ui/api/secrets"),
        "owner token": http(site, "GET", "/ui/api/secrets", token=site.daemon.token),
        "consumer token": http(site, "GET", "/ui/api/secrets", token=consumer["token"]),
    }
    for name, reply in replies.items():
        for header, value in HEADERS.items():
            assert reply.headers.get(header.lower()) == value, (name, header)
    assert {k: (r.status, r.code) for k, r in replies.items() if k not in
            ("page", "script", "style", "api", "usage")} == {
        "missing": (404, "route_not_found"), "refused": (403, "origin_not_allowed"),
        "no token": (401, "unauthorized"), "owner token": (401, "unauthorized"),
        "consumer token": (403, "owner_only")}
    assert replies["page"].headers["content-type"].startswith("text/html")
    assert replies["script"].headers["content-type"].startswith("text/javascript")
    assert replies["style"].headers["content-type"].startswith("text/css")
    assert "leases" in replies["api"].json()
    assert {(r["consumer"], r["provider"]) for r in replies["usage"].json()["usage"]} == {
        ("ugent-core", "openai"), ("ugent-core", "google"), ("context-engine", "jina"),
        ("context-engine", "voyage")}
    for target in ("/v1/admin/secrets", "/v1/leases", "/v1/status"):
        reply = http(site, "GET", target, token=token)
        assert (reply.status, reply.code) == (401, "unauthorized"), target
        assert "content-security-policy" not in reply.headers
    proxied = http(site, "POST", "/proxy/openai/v1/embeddings", token=token,
                   body={"model": "m", "input": "a"})
    assert proxied.status == 401
    sneaky = {"/ui/../v1/admin/secrets": 404, "/ui/%2e%2e/v1/admin/secrets": 404,
              "/ui/..%2Fv1/admin/secrets": 404, "/ui/api/session/../secrets": 401}
    assert {path: http(site, "GET", path).status for path in sneaky} == sneaky  # no way around
    assert http(site, "DELETE", "/ui/api/session", token=token).status == 200
    assert http(site, "GET", "/ui/api/leases", token=token).status == 401
