"""`team check`: every verification rule, the guard's scan, and what needs doing soon."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from broker.core.errors import BrokerError
from broker.core.home import Home
from broker.service.context import Context
from broker.service.team import Teams, find_repo
from broker.service.team_guard import installed, scan, stored_values_of_this_home
from broker.team.guard import RULES
from broker.team.verify import Broken, Marks, verify_team


def check_team(where: str | None, team: str | None, *, ci: bool,
               scan_scope: str = "all") -> dict[str, list[str]]:
    """{"errors": [...], "warnings": [...]}, each a sentence naming the file and the fix.

    `ci`: no home (a CI runner has none): the commit is checked on its own (format,
    signatures, bindings, recipients), not against a pinned fingerprint."""
    errors: list[str] = []
    warnings: list[str] = []
    here = Path(where) if where else Path.cwd()
    if ci:
        repo = find_repo(here)
        head = repo.commit_of("HEAD")
        if head is not None:
            result = verify_team(None, Marks(), repo.files(head))
            if isinstance(result, Broken):
                errors.append(result.message)
        values: list[str] = []
    else:
        teams = Teams(Context.open(Home.from_env()))
        config = teams.pick(team, here)
        repo = find_repo(Path(config.path))
        try:
            checkout = teams.load(config, ref="HEAD")
        except BrokerError as exc:
            errors.append(exc.message)
        else:
            warnings.extend(_warnings(checkout.team.to_rotate(), checkout, config.max_stale_hours))
        if not installed(repo):
            warnings.append(f"the pre-commit guard is not installed in {repo.root}: run "
                            "`secret-broker team hook install`")
        values = stored_values_of_this_home()
    for finding in scan(repo, values, staged_only=scan_scope == "staged"):
        errors.append(f"{finding.path}: {RULES[finding.rule]} (rule {finding.rule})")
    return {"errors": errors, "warnings": warnings}


def _warnings(to_rotate: dict[str, list[str]], checkout: Any, max_stale_hours: int) -> list[str]:
    out = [f"@{ref} was readable by {', '.join(who)}, who lost access: rotate it at the "
           "provider, then `secret-broker team set` the new value" for ref, who in
           sorted(to_rotate.items())]
    admins = [m for m in checkout.team.roster.members.values() if m.role == "admin"]
    if len(admins) < 2:
        out.append("the team has one admin: if their key is lost, nobody can change the "
                   "roster; add a second admin (`team member add … --role admin`)")
    age = (time.time() - checkout.repo.commit_time(checkout.commit)) / 3600
    if age > max_stale_hours:
        out.append(f"the checkout is {age:.0f} hours old (more than max_stale_hours = "
                   f"{max_stale_hours}): run `secret-broker team pull`")
    return out
