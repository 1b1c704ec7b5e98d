"""run/workers.db through two connections, as two workers hold it."""

from __future__ import annotations

from pathlib import Path

from broker.server.access import LeaseTable
from broker.server.shared import Ledger, SharedBudgets, WorkersDB
from grants import AccessRequest, Allow
from grants.model import Grant


def two_workers(tmp_path: Path) -> tuple[WorkersDB, WorkersDB]:
    path = tmp_path / "workers.db"
    WorkersDB.create(path, {("tok_a", "2026-12-05"): 90})
    assert path.stat().st_mode & 0o777 == 0o600
    return WorkersDB(path), WorkersDB(path)


def test_a_budget_is_one_across_workers(tmp_path: Path) -> None:
    """90 of 100 tokens settled at start: a hold of 8 fits, then nothing more, on either."""
    a, b = (SharedBudgets(db) for db in two_workers(tmp_path))
    held = a.reserve("tok_a", "2026-12-05", 100, 8)
    assert held is not None
    assert b.reserve("tok_a", "2026-12-05", 100, 8) is None  # 90 + 8 + 8 > 100
    a.settle(held, 3)  # the answer cost less than its estimate: the rest is free again
    assert b.reserve("tok_a", "2026-12-05", 100, 7) is not None
    assert a.drain() == {("tok_a", "2026-12-05"): 3} and b.drain() == {}


def test_racing_workers_file_one_lease_and_see_each_others_revocations(tmp_path: Path) -> None:
    db_a, db_b = two_workers(tmp_path)
    a, b = Ledger(db_a), Ledger(db_b)
    grant = Grant(index=0, line=1, secret_ref="k", consumer="c", purposes=("llm.chat",),
                  delivery=("native",), allowed_hosts=(), ttl_secs=60)
    request = AccessRequest("c", "k", "llm.chat", "native", None)
    first = LeaseTable().issue(request, Allow(grant, 60), 1)
    second = LeaseTable().issue(request, Allow(grant, 60), 1)
    assert a.claim(first) is first
    assert b.claim(second) == first  # b reuses a's lease instead of filing its own
    assert [lease.lease_id for lease in b.live()] == [first.lease_id]
    assert a.revoked_since_last_look([first.lease_id]) == []
    assert b.revoke([first.lease_id, "lse_unknown"]) == {first.lease_id}
    assert b.revoke([first.lease_id]) == set()  # audited once, by whoever revoked it first
    assert a.revoked_since_last_look([first.lease_id]) == [first.lease_id]
    assert a.live() == [] and a.get(first.lease_id) is None
