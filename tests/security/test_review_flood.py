"""Floods of refused requests, long guessing runs, what a consumer sees of /v1/status, and
how fast a removed grant stops working: a real daemon driven by real clients."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.client import BrokerClient
from broker.core.errors import Denied, UsageError
from broker.core.home import Home
from broker.service.context import Context
from tests.conftest import CANARY, Cli, Daemon, grant, wait_for, write_grants

# Refused requests of each kind. All come from loopback, which is one throttle bucket, so
# together (1,500) they run past the throttle's old overflow (~1,000 failures); the
# overflow itself is unit-tested in tests/unit/test_refusal_flood.py.
PER_KIND = 300
PARALLEL = 1000  # each refusal is held up to 2 s: many at once keep the test short


def audit(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def kinds(port: int, token: str) -> dict[tuple[str, str], tuple[str, str, dict[str, str],
                                                                 bytes | None]]:
    """(audit event, reason) -> one refused request (method, path, headers, body)."""
    host = f"127.0.0.1:{port}"
    return {
        ("request.refused", "host_header_refused"):
            ("GET", "/v1/health", {"Host": "evil.example", "Authorization": f"Bearer {token}"},
             None),
        ("request.refused", "origin_not_allowed"):
            ("GET", "/v1/health", {"Host": host, "Origin": "http://evil.example"}, None),
        ("auth.failed", "invalid"):
            ("GET", "/v1/status", {"Host": host, "Authorization": "Bearer sbt_guess"}, None),
        ("auth.failed", "missing"): ("GET", "/v1/status", {"Host": host}, None),
        ("auth.failed", "login_code"):
            ("POST", "/ui/api/session", {"Host": host, "Content-Type": "application/json"},
             b'{"code": "guess"}'),
    }


async def flood(d: Daemon) -> tuple[Counter[int], int]:
    """Every kind of refusal PER_KIND times, PARALLEL at once; mid-flood, the owner's own
    request. Returns the refusals' statuses and the owner's."""
    statuses: Counter[int] = Counter()
    wanted = kinds(d.port, "sbt_not_the_owner")
    jobs = [spec for spec in wanted.values() for _ in range(PER_KIND)]
    gate = asyncio.Semaphore(PARALLEL)
    connector = aiohttp.TCPConnector(limit=PARALLEL, force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def send(method: str, path: str, headers: dict[str, str],
                       body: bytes | None) -> None:
            async with gate, session.request(method, d.url + path, headers=headers,
                                             data=body) as reply:
                await reply.read()
                statuses[reply.status] += 1

        tasks = [asyncio.create_task(send(*job)) for job in jobs]
        await asyncio.sleep(0)
        async with session.get(d.url + "/v1/status",
                               headers={"Authorization": f"Bearer {d.token}"}) as owner:
            owner_status = owner.status
        await asyncio.gather(*tasks)
    return statuses, owner_status


@pytest.mark.slow
def test_a_flood_of_refusals_grows_the_logs_by_a_bounded_count_that_adds_up(
        cli: Cli, daemon_factory: Any) -> None:
    """Thousands of refusals of each kind: a few audit and log lines whose counts add up,
    401/403 throughout (no 500 past the throttle's ceiling), a verified chain, and the owner
    still served."""
    d = daemon_factory()
    before = len(audit(cli.home))
    started = time.monotonic()
    statuses, owner_status = asyncio.run(flood(d))
    windows = math.ceil((time.monotonic() - started) / 60) + 1
    assert owner_status == 200
    assert statuses == {403: 2 * PER_KIND, 401: 3 * PER_KIND}
    written = len(audit(cli.home)) - before
    assert 5 <= written <= 2 * 5 * windows  # a first line and a count per kind and window
    assert d.client().health()["status"] == "ok"
    assert d.stop() == 0  # the counts of open windows are written at shutdown
    events = audit(cli.home)[before:]
    totals: Counter[tuple[str, str]] = Counter()
    for e in events:
        if e["event"] in ("request.refused", "auth.failed"):
            totals[(e["event"], e["reason"])] += e.get("count", 1)
    assert totals == dict.fromkeys(kinds(d.port, ""), PER_KIND)
    assert len(events) <= 2 * 5 * windows + 3  # + the owner's requests' own, and the stop
    cli.ok("audit", "verify")
    refusal_lines = [line for line in d.log().splitlines()
                     if '"auth.failed"' in line or '"request.refused"' in line]
    assert 5 <= len(refusal_lines) <= 2 * 5 * windows
    assert len(d.log().splitlines()) < 100  # no line per refused request
    assert "sbt_guess" not in d.log() and "guess" not in (cli.home / "audit.log").read_text()


def test_the_admin_audit_route_returns_the_newest_events_of_a_large_log(
        cli: Cli, daemon_factory: Any) -> None:
    """On a large log, `limit` gives the newest matching events, newest last; without one, a
    bounded page; an unbounded limit is refused."""
    ctx = Context.open(Home(cli.home), cli.env, audit_fsync="batch")
    n = 30_000
    for i in range(n):
        ctx.record("lease.issued" if i % 3 else "secret.accessed", count=i)
    ctx.audit_log.close()
    d = daemon_factory()
    owner = d.client()
    newest = owner.request("GET", "/v1/admin/audit?event=secret.accessed&limit=3")["events"]
    assert [e["count"] for e in newest] == [n - 9, n - 6, n - 3]  # n is a multiple of 3
    page = owner.request("GET", "/v1/admin/audit")["events"]
    assert len(page) == 1000
    assert [e["seq"] for e in page] == list(range(page[0]["seq"], page[0]["seq"] + 1000))
    assert page[-1]["event"] == "broker.started"
    assert [e["count"] for e in page if e["event"] == "lease.issued"][-1] == n - 1
    with pytest.raises(UsageError):
        owner.request("GET", "/v1/admin/audit?limit=100000000")


def two_consumers(cli: Cli, daemon_factory: Any) -> tuple[Daemon, BrokerClient, BrokerClient]:
    """A daemon whose grants let agent-a and agent-b use one secret, and their clients."""
    cli.add("@openai_api_key", CANARY)
    write_grants(cli.home, grant("openai_api_key", "agent-a") + grant("openai_api_key",
                                                                      "agent-b"))
    d = daemon_factory()
    tokens = {c: json.loads(cli.ok("token", "create", "--consumer", c, "--json"))["token"]
              for c in ("agent-a", "agent-b")}
    a, b = (d.client(token=tokens[c]) for c in ("agent-a", "agent-b"))
    return d, a, b


def test_consumers_see_only_their_own_status(cli: Cli, daemon_factory: Any) -> None:
    """A consumer token's /v1/status holds its own name and lease count, no grants file
    error, no other consumer's counts, no backend or file paths; the owner sees it all."""
    d, a, b = two_consumers(cli, daemon_factory)
    write_grants(cli.home, "this is [not toml")
    os.kill(d.proc.pid, signal.SIGHUP)
    owner = d.client()
    wait_for(lambda: owner.status()["grants"]["error"], what="the invalid grants file")
    mine = a.status()
    assert mine.keys() == {"status", "version", "uptime_secs", "consumer", "leases"}
    assert (mine["consumer"], mine["leases"]) == ("agent-a", {"active": 0})
    theirs = b.status()
    assert (theirs["consumer"], theirs["leases"]) == ("agent-b", {"active": 0})
    assert "not toml" not in json.dumps([mine, theirs]) and "grants" not in theirs
    full = owner.status()
    assert {"backend", "grants", "requests", "socket", "pid"} <= full.keys()


def test_consumer_status_counts_only_its_own_leases(cli: Cli, daemon_factory: Any) -> None:
    """Two consumers with different lease counts each see exactly their own."""
    d, a, b = two_consumers(cli, daemon_factory)
    a.lease("@openai_api_key", "llm.chat")
    b.lease("@openai_api_key", "llm.chat")
    b.lease("@openai_api_key", "llm.embeddings")
    assert a.status()["leases"] == {"active": 1}
    assert b.status()["leases"] == {"active": 2}
    assert d.client().status()["leases"] == {"active": 3}


@pytest.mark.parametrize("how", ["sighup", "in-place edit"])
def test_a_removed_grant_denies_the_very_next_request(cli: Cli, daemon_factory: Any,
                                                      how: str) -> None:
    """Remove a grant (and send SIGHUP, or only edit the file in place): the very next
    request is denied, even one its still-active lease would have served."""
    cli.add("@openai_api_key", CANARY)
    write_grants(cli.home, grant("openai_api_key"))
    d = daemon_factory()
    owner = d.client()
    first = owner.lease("@openai_api_key", "llm.chat")
    assert owner.lease("@openai_api_key", "llm.chat")["lease_id"] == first["lease_id"]
    other = grant("openai_api_key", "someone-else")
    if how == "sighup":
        write_grants(cli.home, other)
        os.kill(d.proc.pid, signal.SIGHUP)
    else:
        path = cli.home / "secrets.grants.toml"
        old = path.read_text()
        with path.open("r+") as fh:  # same inode; the size changes (a longer consumer)
            fh.write(other)
            fh.truncate()
        assert len(other) != len(old)
    with pytest.raises(Denied):
        owner.lease("@openai_api_key", "llm.chat")
    assert owner.leases() == []
