"""`serve --workers 2`: two real worker processes behave as one broker.

Each test holds one keep-alive connection to each worker (found by asking /v1/status which
process answers), so "every worker" is checked on each, not left to the kernel's choice.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, grant, wait_for, write_grants
from tests.support.gateway import (
    EMBED,
    Broker,
    kill,
    launch,
    provider_grants,
    race_a_budget,
)
from tests.support.standins import StandIn

TWO = "[broker]\nworkers = 2\n"


@dataclass
class Reply:
    status: int
    doc: dict[str, Any]


class Worker:
    """One keep-alive connection, and so one worker process."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.pid = int(self.call("GET", "/v1/status").doc["worker_pid"])

    def call(self, method: str, path: str, body: bytes | None = None, *,
             token: str | None = None, headers: dict[str, str] | None = None) -> Reply:
        sent = {"Authorization": f"Bearer {token or self.token}",
                "Content-Type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=body, headers=sent)
        response = self.conn.getresponse()
        raw = response.read()
        return Reply(response.status, json.loads(raw) if raw else {})

    def embed(self, token: str | None = None) -> Reply:
        return self.call("POST", "/proxy/openai/v1/embeddings", EMBED, token=token)


def one_per_worker(b: Broker, count: int = 2) -> list[Worker]:
    """Open connections until each worker holds one (the kernel picks who accepts)."""
    found: dict[int, Worker] = {}

    def every_worker() -> bool:
        worker = Worker(b.port, b.token)
        found.setdefault(worker.pid, worker)
        return len(found) == count

    wait_for(every_worker, timeout=20, what=f"a connection to each of {count} workers")
    return list(found.values())


@pytest.fixture
def two(cli: Cli, standins: dict[str, StandIn]) -> Iterator[Broker]:
    b = launch(cli, {"openai": standins["openai"]}, extra=TWO)
    yield b
    b.stop()
    kill(b.daemon)


def test_two_workers_answer_as_one_broker_and_racing_requests_mint_one_lease(two: Broker
                                                                            ) -> None:
    workers = one_per_worker(two)
    statuses = [w.call("GET", "/v1/status").doc for w in workers]
    assert {s["pid"] for s in statuses} == {two.daemon.proc.pid}  # the pid file's
    assert [s["workers"] for s in statuses] == [2, 2]
    assert f"pid {two.daemon.proc.pid}, 2 workers" in two.cli.ok("status")
    with ThreadPoolExecutor(20) as pool:  # fresh connections: both workers take some
        assert set(pool.map(lambda _: two.post("openai", "v1/embeddings").status,
                            range(20))) == {200}
    assert len(two.events("lease.issued")) == 1
    assert {w.embed().status for w in workers} == {200}
    leases = [w.call("GET", "/v1/leases").doc["leases"] for w in workers]
    assert leases[0] == leases[1] and len(leases[0]) == 1


def test_a_revoked_token_and_a_removed_grant_are_refused_by_every_worker(two: Broker) -> None:
    workers = one_per_worker(two)
    made = json.loads(two.cli.ok("token", "create", "--consumer", "default", "--json"))
    assert [w.embed(made["token"]).status for w in workers] == [200, 200]
    two.cli.ok("token", "revoke", made["id"])
    assert [w.embed(made["token"]).status for w in workers] == [401, 401]
    assert [w.embed().status for w in workers] == [200, 200]  # the owner's token still works
    write_grants(two.cli.home, grant("other_key"))
    replies = [w.embed() for w in workers]
    assert [(r.status, r.doc["error"]["code"]) for r in replies] == [(403, "grant_denied")] * 2
    assert len(two.standins["openai"].requests) == 4


def test_leases_are_listed_and_revoked_through_any_worker(two: Broker) -> None:
    first, second = one_per_worker(two)
    assert first.embed().status == 200
    listed = second.call("GET", "/v1/leases").doc["leases"]
    assert len(listed) == 1
    lease_id = listed[0]["lease_id"]
    assert second.call("DELETE", f"/v1/leases/{lease_id}").doc == {"lease_id": lease_id,
                                                                   "revoked": True}
    assert first.call("GET", "/v1/leases").doc["leases"] == []
    assert first.embed().status == 200  # a new lease, decided afresh
    issued = [e["lease_id"] for e in two.events("lease.issued")]
    assert len(issued) == 2 and issued[0] == lease_id
    assert [e["lease_id"] for e in two.events("lease.revoked")] == [lease_id]


async def test_a_daily_budget_holds_across_workers(two: Broker) -> None:
    """20 concurrent requests on both workers overshoot a budget by one request at most."""
    one_per_worker(two)
    results = await race_a_budget(two)
    per_request = 7 + 5
    assert 0 < sum(results) < 20
    assert sum(results) * per_request <= 100 + per_request
    assert len(two.standins["openai"].requests) == sum(results)


def test_a_login_code_from_one_worker_opens_a_session_on_the_other(two: Broker) -> None:
    first, second = one_per_worker(two)
    code = first.call("POST", "/v1/admin/ui/code").doc["code"]
    host = {"Host": f"127.0.0.1:{two.port}"}
    login = second.call("POST", "/ui/api/session", json.dumps({"code": code}).encode(),
                        headers=host)
    assert login.status == 200
    session = login.doc["token"]
    assert first.call("GET", "/ui/api/leases", token=session, headers=host).status == 200
    again = first.call("POST", "/ui/api/session", json.dumps({"code": code}).encode(),
                       headers=host)
    assert again.status == 401  # a code opens one session, whichever worker it reaches
    assert second.call("DELETE", "/ui/api/session", token=session, headers=host).status == 200
    assert first.call("GET", "/ui/api/leases", token=session, headers=host).status == 401


def test_sighup_reaches_every_worker_a_dead_one_is_replaced_and_stop_ends_all(
        cli: Cli, standins: dict[str, StandIn]) -> None:
    stand = standins["openai"]
    b = launch(cli, {"openai": stand}, extra=TWO, grants=provider_grants({"openai": stand}))
    try:
        workers = one_per_worker(b)
        loaded = {w.pid: w.call("GET", "/v1/status").doc["grants"]["loaded_at"]
                  for w in workers}
        os.kill(b.daemon.proc.pid, signal.SIGHUP)
        wait_for(lambda: all(w.call("GET", "/v1/status").doc["grants"]["loaded_at"]
                             != loaded[w.pid] for w in workers), what="both workers to reload")
        os.kill(workers[0].pid, signal.SIGKILL)
        replaced = one_per_worker(b)
        assert workers[0].pid not in {w.pid for w in replaced}
        assert {w.embed().status for w in replaced} == {200}
        pids = [w.pid for w in replaced]
        assert b.daemon.stop() == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not (cli.home / "run" / "workers.db").exists()
        assert "worker.died" in b.log()
        assert cli("audit", "verify").returncode == 0
    finally:
        kill(b.daemon)


def test_the_audit_chain_holds_under_attack_load_on_two_workers() -> None:
    """scripts/attack_load.py on two workers: every legitimate request served, every refusal
    as expected, every served request on record, and `audit verify` passes (its exit 0)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "attack_load.py"
    run = subprocess.run([sys.executable, str(script), "--workers", "2", "--requests", "2000",
                          "--concurrency", "32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2000 ok, 0 failed" in run.stdout and "chain and seals intact" in run.stdout


def test_bad_tokens_are_slowed_as_one_count_across_workers(two: Broker) -> None:
    """Four wrong tokens on each worker: eight failures in one shared count, so the last
    three are slowed (10, 20, 40 ms), though neither worker alone saw more than the five
    free ones. The daemon logs the longest slow-down of each refusal window."""
    first, second = one_per_worker(two)
    for worker in (first, second):
        assert {worker.call("GET", "/v1/health", token="sbt_wrong").status
                for _ in range(4)} == {401}
    assert two.daemon.stop() == 0  # writes each worker's open windows with their delays
    delays = [json.loads(line).get("delay_ms", 0) for line in two.log().splitlines()
              if '"auth.failed"' in line]
    assert max(delays) == 40


def test_a_rotated_secret_reaches_every_worker_at_once(two: Broker) -> None:
    """Each worker sends the new value on its very next request (the stand-in now accepts
    only that one), and the rotation is audited once."""
    workers = one_per_worker(two)
    assert [w.embed().status for w in workers] == [200, 200]
    stand = two.standins["openai"]
    stand.expected_key = "sk-rotated-0123456789"
    two.cli.ok("rotate", "@openai_api_key", "--stdin", input=stand.expected_key + "\n")
    assert [w.embed().status for w in workers] == [200, 200]  # the stand-in checks the key
    assert len(stand.requests) == 4
    assert len(two.events("secret.rotated")) == 1


def test_start_workers_runs_two_in_the_background_and_stop_ends_them(cli: Cli) -> None:
    """`start --workers 2` as a user types it: status names both, stop ends every process."""
    out = cli.ok("start", "--listen", "127.0.0.1:0", "--workers", "2")
    pid = int(out.split("(pid ", 1)[1].split(")", 1)[0])
    try:
        status = json.loads(cli.ok("status", "--json"))
        assert (status["pid"], status["workers"]) == (pid, 2)
        assert f"running: pid {pid}, 2 workers," in cli.ok("status")
        worker = status["worker_pid"]
        assert worker != pid
        assert cli.ok("stop").strip() == f"broker stopped (pid {pid})"
        # Neither is our child, so either may linger as a zombie until init reaps it.
        wait_for(lambda: not any(running(p) for p in (pid, worker)), timeout=10,
                 what="the supervisor and its worker to exit")
    finally:
        cli("stop")
    refused = cli("start", "--workers", "0")
    assert refused.returncode == 2 and "at least 1, or auto" in refused.stderr


def running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
