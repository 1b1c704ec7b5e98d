"""broker.server.access: leases acquired, reused, revoked and reloaded, on an injected clock.

Pure: a grants file in a temp dir, a list for the audit records, no daemon and no sleep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.core.errors import Denied
from broker.server.access import Access
from grants import AccessRequest, Allow, LeaseKey
from tests.conftest import grant, write_grants

CHAT: LeaseKey = ("agent", "@openai_api_key", "llm.chat", "native", "api.openai.com")


class Clock:
    """A clock the test moves by hand, so expiry needs no sleep."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Collects audit records; `fail` makes the next ones raise, as a full disk would."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fail = False

    def __call__(self, event: str, **fields: Any) -> None:
        if self.fail:
            raise OSError("no space left on device")
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [event for event, _ in self.events]


@pytest.fixture
def clock() -> Clock:
    """A fresh fake clock."""
    return Clock()


@pytest.fixture
def audit() -> Recorder:
    """A fresh audit recorder."""
    return Recorder()


@pytest.fixture
def access(tmp_path: Path, clock: Clock, audit: Recorder) -> Access:
    """An Access on a grants file allowing CHAT for 60 s, loaded once."""
    write_grants(tmp_path, grant("openai_api_key", "agent", ttl=60))
    a = Access(tmp_path / "secrets.grants.toml", audit, clock)
    a.reload("start")
    return a


def test_acquire_issues_one_lease_and_reuses_it_until_expiry(access: Access, clock: Clock,
                                                               audit: Recorder) -> None:
    """The same request reuses the active lease (one audit record); after ttl a new one."""
    first = access.acquire(CHAT, 1)
    assert access.acquire(CHAT, 1) is first
    assert audit.names() == ["grants.reloaded", "lease.issued"]
    assert audit.events[1][1]["lease_id"] == first.lease_id
    clock.now += 60
    second = access.acquire(CHAT, 1)
    assert second.lease_id != first.lease_id
    assert second.expires_at == clock.now + 60


def test_a_new_secret_version_gets_a_new_lease(access: Access) -> None:
    """A lease is for one value: after a rotation the same request is decided again."""
    old = access.acquire(CHAT, 1)
    new = access.acquire(CHAT, 2)
    assert new.lease_id != old.lease_id and new.secret_version == 2


def test_denied_request_is_audited_and_raises(access: Access, audit: Recorder) -> None:
    """No grant: Denied, a lease.denied record with the reason, and no lease."""
    other = ("stranger", "openai_api_key", "llm.chat", "native", "api.openai.com")
    with pytest.raises(Denied):
        access.acquire(other, 1)
    assert audit.names()[-1] == "lease.denied"
    assert audit.events[-1][1]["consumer"] == "stranger"
    assert access.table.list() == []


def test_no_audit_no_lease(access: Access, audit: Recorder) -> None:
    """When the lease.issued record cannot be written the lease is withdrawn."""
    audit.fail = True
    with pytest.raises(OSError):
        access.acquire(CHAT, 1)
    assert access.table.list() == []


def test_revoke_ends_the_lease_and_records_why(access: Access, audit: Recorder) -> None:
    """revoke() removes the lease and records lease.revoked with the reason; twice is None."""
    lease = access.acquire(CHAT, 1)
    assert access.revoke(lease.lease_id, "by hand") == lease
    assert audit.events[-1] == ("lease.revoked", {
        "lease_id": lease.lease_id, "consumer": "agent", "secret_ref": "openai_api_key",
        "reason": "by hand"})
    assert access.revoke(lease.lease_id, "again") is None
    assert access.acquire(CHAT, 1).lease_id != lease.lease_id


def test_consumer_ended_and_secret_changed_revoke_their_leases(access: Access,
                                                               audit: Recorder) -> None:
    """A consumer's end and a secret's removal each revoke exactly the matching leases."""
    access.acquire(CHAT, 1)
    access.consumer_ended("someone-else", "token revoked")
    assert len(access.table.list()) == 1
    access.consumer_ended("agent", "token revoked")
    assert access.table.list() == []
    access.acquire(CHAT, 1)
    access.secret_changed("openai_api_key", 1)  # the current version: kept
    assert len(access.table.list()) == 1
    access.secret_changed("openai_api_key", None)
    assert access.table.list() == []
    assert [f["reason"] for e, f in audit.events if e == "lease.revoked"] == [
        "token revoked", "secret removed"]


def test_edit_removing_the_grant_denies_the_next_request(tmp_path: Path, access: Access,
                                                         audit: Recorder) -> None:
    """A rewritten grants file is noticed on the next acquire: the lease is revoked at once."""
    access.acquire(CHAT, 1)
    write_grants(tmp_path, grant("openai_api_key", "someone-else", ttl=60))
    with pytest.raises(Denied):
        access.acquire(CHAT, 1)
    assert "lease.revoked" in audit.names()
    assert access.table.list() == []


def test_invalid_file_denies_everything_until_fixed(tmp_path: Path, access: Access,
                                                    audit: Recorder) -> None:
    """A broken grants file revokes every lease and denies; fixing it allows again."""
    access.acquire(CHAT, 1)
    write_grants(tmp_path, "[[grants]]\nsecret_ref = \n")
    decision = access.decide(AccessRequest(*CHAT))
    assert not isinstance(decision, Allow) and "invalid" in decision.reason
    assert not access.state.valid and access.table.list() == []
    assert "grants.invalid" in audit.names()
    write_grants(tmp_path, grant("openai_api_key", "agent", ttl=60))
    assert isinstance(access.decide(AccessRequest(*CHAT)), Allow)
    assert access.state.valid


def test_revocation_happens_even_when_the_audit_fails(tmp_path: Path, access: Access,
                                                      audit: Recorder) -> None:
    """Revoking must not wait for the audit log: a failing record still ends the lease."""
    access.acquire(CHAT, 1)
    audit.fail = True
    access.reload("by hand")
    write_grants(tmp_path, "")
    access.reload_if_changed()
    assert access.table.list() == []


def test_decide_leaves_no_lease_and_no_record(access: Access, audit: Recorder) -> None:
    """decide() (for explain) answers without issuing or auditing."""
    assert isinstance(access.decide(AccessRequest(*CHAT)), Allow)
    assert access.table.list() == [] and audit.names() == ["grants.reloaded"]
