"""A home that is served a team, on the dashboard in a real headless Chromium: the team's
refs are listed read-only, with nothing on the page to rotate or remove them, and no value
reaches the page."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import Site, Watched
from tests.browser.harness import owner
from tests.conftest import CANARY, start_daemon
from tests.support.team import VALUE, VALUE_2, World


def test_team_refs_are_read_only_on_the_dashboard(world: World, watched: Watched) -> None:
    ci = world["ci"]
    ci.cli.add("@local_key", CANARY)
    site = Site(ci.cli, start_daemon(ci.cli.home, ci.cli.env))
    try:
        page = watched.signed_in(site)
        rows = page.locator("#secrets-table tbody tr")
        local_row = rows.filter(has_text="@local_key")
        # Both of the team's refs are listed (ci can decrypt only the llm group's), neither
        # with a button.
        for team_ref in ("@acme.openai_api_key", "@acme.db_password"):
            team_row = rows.filter(has_text=team_ref)
            expect(team_row.locator("td").nth(3)).to_have_text("team:acme")
            expect(team_row).to_contain_text("read-only: `team set` in its repository")
            expect(team_row.get_by_role("button")).to_have_count(0)
        expect(local_row.get_by_role("button", name="Rotate @local_key")).to_be_visible()
        expect(local_row.get_by_role("button", name="Remove @local_key")).to_be_visible()

        choices = page.locator("#rotate-form select option")
        assert choices.all_text_contents() == ["@local_key"]

        served = {s["ref"]: s for s in owner(site.daemon).request(
            "GET", "/v1/admin/secrets")["secrets"]}
        assert served["acme.openai_api_key"]["read_only"] is True
        assert watched.errors == []
        assert watched.leaks(VALUE, VALUE_2, CANARY) == []
        assert site.daemon.proc.poll() is None
    finally:
        site.daemon.stop()
