"""The lease table (server/access): leases expire on an injected clock, are reused by key
and revoked on change."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.server.access import LeaseTable, lease_key, of_secret, unallowed
from grants import AccessRequest, Allow, Grant, Lease, decide, parse_grants
from tests.conftest import grant

GRANTS = parse_grants(
    grant("openai_api_key", "ugent-core", '"llm.chat"', '"http_header_inject"')
    + grant("voyage_api_key", "ugent-core", '"llm.embeddings"', '"native"',
            '"api.voyageai.com"', ttl=60)
)
CHAT = AccessRequest(
    "ugent-core", "@openai_api_key", "llm.chat", "http_header_inject", "API.openai.com"
)
EMBED = AccessRequest("ugent-core", "voyage_api_key", "llm.embeddings", "native", None)


class FakeClock:
    """A clock the test moves by hand, so expiry needs no sleep."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def allow(req: AccessRequest, grants: tuple[Grant, ...] = GRANTS) -> Allow:
    """The Allow decide() gives `req`; fails the test on a denial."""
    decision = decide(grants, req)
    assert isinstance(decision, Allow), decision
    return decision


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock."""
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> LeaseTable:
    """An empty lease table on the fake clock."""
    return LeaseTable(clock)


def test_issue_records_request_grant_version_and_expiry(
    table: LeaseTable, clock: FakeClock
) -> None:
    """A lease carries the normalised request, grant index, secret version and TTL window."""
    lease = table.issue(CHAT, allow(CHAT), secret_version=3)
    assert lease.lease_id.startswith("lse_") and len(lease.lease_id) > 20
    assert lease.key == (
        "ugent-core",
        "openai_api_key",
        "llm.chat",
        "http_header_inject",
        "api.openai.com",
    )
    assert (lease.grant_index, lease.secret_version) == (0, 3)
    assert (lease.issued_at, lease.expires_at) == (clock.now, clock.now + 300)


def test_lease_ids_are_unique(table: LeaseTable) -> None:
    """Every issued lease has its own id."""
    ids = {table.issue(CHAT, allow(CHAT), 1).lease_id for _ in range(50)}
    assert len(ids) == 50


def test_active_finds_the_lease_by_normalised_key(table: LeaseTable) -> None:
    """A repeat request finds the live lease, whether or not it writes `@` or the host's case."""
    lease = table.issue(CHAT, allow(CHAT), 1)
    assert table.active(lease_key(CHAT)) == lease
    assert (
        table.active(
            ("ugent-core", "openai_api_key", "llm.chat", "http_header_inject", "api.OPENAI.com")
        )
        == lease
    )
    assert table.active(lease_key(EMBED)) is None


def test_lease_expires_exactly_at_expires_at(table: LeaseTable, clock: FakeClock) -> None:
    """At expires_at the lease is gone from active(), get(), list() and len()."""
    lease = table.issue(CHAT, allow(CHAT), 1)
    clock.now = lease.expires_at - 0.001
    assert table.get(lease.lease_id) == lease and len(table) == 1
    clock.now = lease.expires_at
    assert table.active(lease.key) is None
    assert table.get(lease.lease_id) is None
    assert table.list() == [] and len(table) == 0


def test_list_is_oldest_first_and_prunes(table: LeaseTable, clock: FakeClock) -> None:
    """list() gives live leases in issue order and drops expired ones."""
    chat = table.issue(CHAT, allow(CHAT), 1)
    clock.now += 10
    embed = table.issue(EMBED, allow(EMBED), 1)
    assert table.list() == [chat, embed]
    clock.now = embed.expires_at
    assert table.list() == [chat]


def test_reissue_replaces_the_reuse_entry_but_keeps_the_old_lease(table: LeaseTable) -> None:
    """A new lease under the same key is the one reused; the old one lives to its expiry."""
    old = table.issue(CHAT, allow(CHAT), 1)
    new = table.issue(CHAT, allow(CHAT), 2)
    assert table.active(lease_key(CHAT)) == new
    assert table.get(old.lease_id) == old
    assert table.revoke(old.lease_id) == old
    assert table.active(lease_key(CHAT)) == new  # revoking the old one leaves the new in place


def test_revoke_ends_a_lease_once(table: LeaseTable) -> None:
    """revoke() returns the lease the first time, then None; it is gone everywhere."""
    lease = table.issue(CHAT, allow(CHAT), 1)
    assert table.revoke(lease.lease_id) == lease
    assert table.revoke(lease.lease_id) is None
    assert table.get(lease.lease_id) is None and table.active(lease.key) is None
    assert table.revoke("lse_unknown") is None


def test_revoke_of_expired_lease_returns_none(table: LeaseTable, clock: FakeClock) -> None:
    """An expired lease cannot be revoked: it already ended."""
    lease = table.issue(CHAT, allow(CHAT), 1)
    clock.now = lease.expires_at
    assert table.revoke(lease.lease_id) is None


def test_revoke_where_selects_by_predicate(table: LeaseTable) -> None:
    """revoke_where ends exactly the live leases the predicate picks."""
    chat = table.issue(CHAT, allow(CHAT), 1)
    embed = table.issue(EMBED, allow(EMBED), 1)
    assert table.revoke_where(lambda lease: lease.delivery == "native") == [embed]
    assert table.list() == [chat]


def test_revoke_secret_keeps_the_current_version(table: LeaseTable) -> None:
    """On rotation, leases of the old version end and those of keep_version stay."""
    old = table.issue(CHAT, allow(CHAT), 1)
    new = table.issue(replace(CHAT, host="api.openai.com"), allow(CHAT), 2)
    embed = table.issue(EMBED, allow(EMBED), 1)
    assert table.revoke_where(of_secret("@openai_api_key", keep_version=2)) == [old]
    assert table.list() == [new, embed]


def test_revoke_secret_without_version_ends_all_of_it(table: LeaseTable) -> None:
    """On removal, every lease of the secret ends, and no other."""
    table.issue(CHAT, allow(CHAT), 1)
    table.issue(CHAT, allow(CHAT), 2)
    embed = table.issue(EMBED, allow(EMBED), 1)
    assert len(table.revoke_where(of_secret("openai_api_key"))) == 2
    assert table.list() == [embed]


def test_revoke_unallowed_after_grant_removed(table: LeaseTable) -> None:
    """After a reload without the openai grant, only its leases are revoked."""
    chat = table.issue(CHAT, allow(CHAT), 1)
    embed = table.issue(EMBED, allow(EMBED), 1)
    assert table.revoke_where(unallowed(GRANTS[1:])) == [chat]
    assert table.list() == [embed]
    assert table.revoke_where(unallowed(GRANTS)) == []


def test_revoke_unallowed_on_narrowed_hosts(table: LeaseTable) -> None:
    """A lease whose host the reloaded grant no longer lists is revoked."""
    table.issue(CHAT, allow(CHAT), 1)
    narrowed = (replace(GRANTS[0], allowed_hosts=("proxy.local",)), GRANTS[1])
    assert [lease.host for lease in table.revoke_where(unallowed(narrowed))] == ["api.openai.com"]
    assert len(table) == 0


def test_default_clock_is_wall_time() -> None:
    """Without an injected clock, leases are stamped with real time and live for their TTL."""
    lease = LeaseTable().issue(CHAT, allow(CHAT), 1)
    assert lease.expires_at - lease.issued_at == pytest.approx(300)
    assert lease.issued_at > 1_600_000_000


@given(
    start=st.floats(0, 4e9, allow_nan=False),
    ttl=st.integers(1, 86400),
    steps=st.lists(st.floats(0, 90_000, allow_nan=False), min_size=1, max_size=8),
)
def test_property_a_lease_never_outlives_its_ttl(
    start: float, ttl: int, steps: list[float]
) -> None:
    """However time advances, a lease is visible exactly while now < issued_at + ttl."""
    clock = FakeClock(start)
    table = LeaseTable(clock)
    grant = replace(GRANTS[0], ttl_secs=ttl)
    lease = table.issue(CHAT, Allow(grant, ttl), 1)
    assert lease.expires_at == lease.issued_at + ttl
    assert lease.expires_at - lease.issued_at == pytest.approx(ttl, abs=1e-6)
    for step in steps:
        clock.now += step
        live = clock.now < lease.expires_at
        assert (table.get(lease.lease_id) == lease) is live
        assert (table.active(lease.key) == lease) is live
        assert (table.list() == [lease]) is live
        assert len(table) == int(live)


_requests = st.builds(
    AccessRequest,
    consumer=st.sampled_from(["c1", "c2"]),
    secret_ref=st.sampled_from(["a", "@b"]),
    purpose=st.sampled_from([None, "p1", "p2"]),
    delivery=st.sampled_from(["native", "http_header_inject", "env"]),
    host=st.sampled_from([None, "h1", "h2"]),
)
_grant = st.builds(
    lambda ref, consumer, purposes, delivery, hosts: Grant(
        0, 1, ref, consumer, purposes, delivery, hosts, 60
    ),
    st.sampled_from(["a", "b"]),
    st.sampled_from(["c1", "c2"]),
    st.sampled_from([("p1",), ("p2",), ("p1", "p2")]),
    st.sampled_from(
        [("native",), ("env",), ("http_header_inject",), ("native", "http_header_inject", "env")]
    ),
    st.sampled_from([("h1",), ("h2",), ("h1", "h2")]),
)


@given(st.lists(_grant, min_size=1, max_size=6), st.lists(_requests, max_size=12), st.data())
def test_property_revoke_unallowed_drops_exactly_the_unallowed(
    grants: list[Grant], reqs: list[AccessRequest], data: st.DataObject
) -> None:
    """After removing a grant, `unallowed` selects exactly the leases decide() now denies."""
    grants = [replace(g, index=i, line=1 + 7 * i) for i, g in enumerate(grants)]
    table = LeaseTable(FakeClock())
    leases: list[Lease] = []
    for req in reqs:
        decision = decide(grants, req)
        if isinstance(decision, Allow):
            leases.append(table.issue(req, decision, 1))
    del grants[data.draw(st.integers(0, len(grants) - 1))]

    revoked = table.revoke_where(unallowed(grants))

    def still_allowed(lease: Lease) -> bool:
        return isinstance(decide(grants, AccessRequest(*lease.key)), Allow)

    assert revoked == [lease for lease in leases if not still_allowed(lease)]
    assert table.list() == [lease for lease in leases if still_allowed(lease)]
