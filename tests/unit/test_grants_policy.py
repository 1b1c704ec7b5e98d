"""grants.policy.decide: deny by default, first matching grant wins, reasons say what to fix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grants import (
    DELIVERIES,
    AccessRequest,
    Allow,
    Deny,
    Grant,
    decide,
    grants_as_rows,
    parse_grants,
)

GRANTS = parse_grants(
    """\
[[grants]]
secret_ref = "openai_api_key"
consumer = "ugent-core"
purposes = ["llm.chat", "llm.embeddings"]
delivery = ["native", "http_header_inject"]
allowed_hosts = ["api.openai.com", "Proxy.Local:8443"]
ttl_secs = 300

[[grants]]
secret_ref = "@service_tokens"
consumer = "context-engine"
purposes = ["service.auth"]
delivery = ["env"]
allowed_hosts = ["127.0.0.1"]
ttl_secs = 60

[[grants]]
secret_ref = "openai_api_key"
consumer = "ugent-core"
purposes = ["llm.rerank"]
delivery = ["http_header_inject"]
allowed_hosts = ["api.openai.com"]
ttl_secs = 30
"""
)


def request(
    consumer: str = "ugent-core",
    ref: str = "@openai_api_key",
    purpose: str | None = "llm.chat",
    delivery: str = "http_header_inject",
    host: str | None = "api.openai.com",
) -> AccessRequest:
    """A request that the first grant allows, with any part replaced."""
    return AccessRequest(consumer, ref, purpose, delivery, host)


def allowed_by(req: AccessRequest) -> Grant:
    """The grant that allows `req`; fails the test on a denial."""
    decision = decide(GRANTS, req)
    assert isinstance(decision, Allow), decision
    assert decision.allowed is True and decision.ttl_secs == decision.grant.ttl_secs
    return decision.grant


def denial(req: AccessRequest) -> str:
    """The reason `req` is denied; fails the test on an allow."""
    decision = decide(GRANTS, req)
    assert isinstance(decision, Deny), decision
    assert decision.allowed is False
    return decision.reason


def test_allow_carries_grant_index_line_and_ttl() -> None:
    """An allowed request names the grant (index, line) and its TTL, for `grants explain`."""
    decision = decide(GRANTS, request())
    assert isinstance(decision, Allow)
    assert (decision.grant.index, decision.grant.line, decision.ttl_secs) == (0, 1, 300)


@pytest.mark.parametrize("ref", ["openai_api_key", "@openai_api_key"])
def test_refs_match_with_or_without_at(ref: str) -> None:
    """`@ref` in a request or in the file names the same secret."""
    assert allowed_by(request(ref=ref)).index == 0
    env_ref = ref.replace("openai_api_key", "service_tokens")  # written "@service_tokens"
    assert allowed_by(AccessRequest("context-engine", env_ref, None, "env", None)).index == 1


ASKED = ("consumer 'ugent-core', purpose 'llm.chat', delivery 'http_header_inject', "
         "host 'api.openai.com'")


def test_empty_grants_deny() -> None:
    """No grants (missing file) denies everything, naming the secret."""
    decision = decide((), request())
    assert isinstance(decision, Deny)
    assert decision.reason == f"no grant for secret 'openai_api_key' (asked: {ASKED})"


def test_unknown_secret_is_denied() -> None:
    """A secret no grant mentions is denied, naming it."""
    assert denial(request(ref="@anthropic_key")) == (
        f"no grant for secret 'anthropic_key' (asked: {ASKED})")


def test_refs_are_case_sensitive() -> None:
    """Refs are exact names: a different case is a different secret."""
    assert denial(request(ref="OpenAI_API_Key")) == (
        f"no grant for secret 'OpenAI_API_Key' (asked: {ASKED})")


def test_other_consumer_is_denied() -> None:
    """A consumer without a grant on the secret is denied, naming consumer and secret."""
    reason = denial(request(consumer="Ugent-core"))
    assert reason == "no grant gives consumer 'Ugent-core' secret 'openai_api_key'"


def test_other_purpose_is_denied_naming_purpose_and_nearest_grant() -> None:
    """A purpose no grant for this consumer lists is denied with the grant to edit."""
    reason = denial(request(purpose="llm.images"))
    assert reason == (
        "no grant gives consumer 'ugent-core' purpose 'llm.images' on secret 'openai_api_key'; "
        'grant 0 (line 1) has purposes = ["llm.chat", "llm.embeddings"]'
    )


def test_other_delivery_is_denied() -> None:
    """A delivery the matching grants do not list is denied, naming it."""
    reason = denial(request(purpose="llm.rerank", delivery="native", host=None))
    assert reason.startswith(
        "no grant gives consumer 'ugent-core' purpose 'llm.rerank' delivery 'native' on secret"
    )
    assert reason.endswith('grant 2 (line 17) has delivery = ["http_header_inject"]')


def test_host_not_allowed_is_denied_naming_host() -> None:
    """An upstream host outside allowed_hosts is denied, naming the host."""
    reason = denial(request(host="evil.example"))
    assert "to host 'evil.example' on secret 'openai_api_key'" in reason
    assert 'allowed_hosts = ["api.openai.com", "proxy.local:8443"]' in reason


def test_host_match_is_case_insensitive() -> None:
    """Hosts match regardless of case, on either side."""
    assert allowed_by(request(host="API.OpenAI.COM")).index == 0
    assert allowed_by(request(host="proxy.LOCAL:8443")).index == 0


def test_host_port_entry_matches_only_that_port() -> None:
    """`host:port` in allowed_hosts allows that port, not another and not the bare host."""
    assert allowed_by(request(host="proxy.local:8443")).index == 0
    assert "to host 'proxy.local:443'" in denial(request(host="proxy.local:443"))
    assert "to host 'proxy.local'" in denial(request(host="proxy.local"))


def test_bare_host_entry_matches_only_without_port() -> None:
    """A bare `host` entry allows requests naming no port, and no explicit port."""
    assert allowed_by(request(host="api.openai.com")).index == 0
    assert "to host 'api.openai.com:443'" in denial(request(host="api.openai.com:443"))


def test_native_without_host_skips_the_host_check() -> None:
    """A native delivery with no upstream host is judged without allowed_hosts."""
    assert allowed_by(request(delivery="native", host=None)).index == 0


def test_native_with_host_checks_it() -> None:
    """When a native request names a host, allowed_hosts still applies."""
    assert "to host 'evil.example'" in denial(request(delivery="native", host="evil.example"))


def test_no_host_skips_the_host_check_for_injection_too() -> None:
    """A host-less request (a `POST /v1/leases` record) is judged without allowed_hosts."""
    assert allowed_by(request(host=None)).index == 0


@pytest.mark.parametrize("purpose", [None, "anything", "service.auth"])
@pytest.mark.parametrize("host", [None, "evil.example", "127.0.0.1"])
def test_env_ignores_purpose_and_hosts(purpose: str | None, host: str | None) -> None:
    """Delivery env matches on secret, consumer and delivery only (SPEC §13)."""
    req = AccessRequest("context-engine", "service_tokens", purpose, "env", host)
    assert allowed_by(req).index == 1


def test_env_not_granted_is_denied() -> None:
    """A grant without delivery env does not allow env, whatever purpose is given."""
    reason = denial(request(purpose=None, delivery="env", host=None))
    assert reason.startswith("no grant gives consumer 'ugent-core' delivery 'env' on secret")


def test_missing_purpose_is_denied_except_for_env() -> None:
    """Deliveries other than env need a purpose."""
    assert "needs a purpose" in denial(request(purpose=None))


def test_unknown_delivery_is_denied() -> None:
    """A delivery outside the known three is denied, naming it."""
    assert denial(request(delivery="smoke_signal")).startswith("unknown delivery 'smoke_signal'")


def test_first_matching_grant_wins() -> None:
    """Among several matching grants the earliest in the file decides."""
    twice = (*GRANTS, GRANTS[0])
    decision = decide(twice, request())
    assert isinstance(decision, Allow) and decision.grant.index == 0
    assert allowed_by(request(purpose="llm.rerank")).index == 2


def test_grants_as_rows_is_json_ready() -> None:
    """Rows carry every grant field, with lists instead of tuples."""
    assert grants_as_rows(GRANTS[:1]) == [
        {
            "index": 0,
            "line": 1,
            "secret_ref": "openai_api_key",
            "consumer": "ugent-core",
            "purposes": ["llm.chat", "llm.embeddings"],
            "delivery": ["native", "http_header_inject"],
            "allowed_hosts": ["api.openai.com", "proxy.local:8443"],
            "ttl_secs": 300,
        }
    ]


# Small alphabets so random grants and requests actually meet.
_hosts = st.sampled_from(["h1", "h1:8080", "h2"])
_grant_fields = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["c1", "c2"]),
    st.lists(st.sampled_from(["p1", "p2"]), min_size=1, max_size=2, unique=True),
    st.lists(st.sampled_from(sorted(DELIVERIES)), min_size=1, max_size=3, unique=True),
    st.lists(_hosts, min_size=1, max_size=3, unique=True),
    st.integers(1, 86400),
)
GrantFields = tuple[str, str, list[str], list[str], list[str], int]


def build(index: int, fields: GrantFields) -> Grant:
    """A Grant at `index` from generated fields."""
    ref, consumer, purposes, delivery, hosts, ttl = fields
    return Grant(
        index, 1 + 7 * index, ref, consumer, tuple(purposes), tuple(delivery), tuple(hosts), ttl
    )


grant_lists = st.lists(_grant_fields, max_size=6).map(
    lambda rows: [build(i, fields) for i, fields in enumerate(rows)]
)
one_grant = _grant_fields.map(lambda fields: build(99, fields))
requests = st.builds(
    AccessRequest,
    consumer=st.sampled_from(["c1", "c2", "c3"]),
    secret_ref=st.sampled_from(["a", "@a", "b", "z"]),
    purpose=st.sampled_from([None, "p1", "p2", "p3"]),
    delivery=st.sampled_from([*sorted(DELIVERIES), "bogus"]),
    host=st.sampled_from([None, "h1", "H1", "h1:8080", "h2", "h3"]),
)


def matches(grant: Grant, req: AccessRequest) -> bool:
    """The rule of SPEC §5/§13 for one grant, written out as a single predicate."""
    env = req.delivery == "env"
    return (
        grant.secret_ref == req.secret_ref.removeprefix("@")
        and grant.consumer == req.consumer
        and req.delivery in grant.delivery
        and (env or (req.purpose is not None and req.purpose in grant.purposes))
        and (env or req.host is None or req.host.lower() in grant.allowed_hosts)
    )


@given(requests)
def test_property_empty_grants_deny_everything(req: AccessRequest) -> None:
    """With no grants, every request is denied."""
    assert isinstance(decide([], req), Deny)


@given(grant_lists, requests)
def test_property_decide_agrees_with_the_rule(grants: list[Grant], req: AccessRequest) -> None:
    """decide allows exactly when some grant matches, and under the first one that does."""
    first = next((g for g in grants if matches(g, req)), None)
    decision = decide(grants, req)
    if first is None:
        assert isinstance(decision, Deny) and decision.reason
    else:
        assert isinstance(decision, Allow) and decision.grant == first


@given(grant_lists, one_grant, st.integers(0, 6), requests)
def test_property_adding_a_grant_never_removes_access(
    grants: list[Grant], new: Grant, at: int, req: AccessRequest
) -> None:
    """A request allowed before a grant is added is still allowed after."""
    if isinstance(decide(grants, req), Allow):
        assert isinstance(decide([*grants[:at], new, *grants[at:]], req), Allow)


@given(grant_lists, st.integers(0, 5), requests)
def test_property_removing_a_grant_never_adds_access(
    grants: list[Grant], at: int, req: AccessRequest
) -> None:
    """A request denied before a grant is removed is still denied after."""
    if isinstance(decide(grants, req), Deny):
        assert isinstance(decide(grants[:at] + grants[at + 1 :], req), Deny)
