"""The dashboard's pure parts: the /ui/ guard, login codes and sessions, session scoping."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict

from broker.core.digest import token_hash
from broker.core.errors import Unauthorized
from broker.server.auth import Authenticator
from broker.server.middlewares import dashboard_refusal as refusal
from broker.server.middlewares import needs_no_token
from broker.server.ui import Logins

PORT = 28443  # data only: nothing binds it
OWN = f"127.0.0.1:{PORT}"
PAGE = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
TYPED = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}


def guard(method: str, path: str, *pairs: tuple[str, str], host: str | None = OWN,
          **headers: str) -> str | None:
    sent = CIMultiDict([("Host", host)] if host is not None else [])
    sent.extend(pairs)
    sent.extend((name.replace("_", "-"), value) for name, value in headers.items())
    found = refusal(method, path, sent, PORT)
    return None if found is None else found[0]


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("GET", "/ui/", {}),  # curl, or a browser too old to say where it comes from
    ("GET", "/ui/", TYPED),  # typed into the address bar
    ("GET", "/ui/", {**TYPED, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "document"}),
    # ^ sent on by the file: page that `secret-broker ui` opens
    ("GET", "/ui/app.js", {**PAGE, "Sec-Fetch-Mode": "no-cors"}),
    ("POST", "/ui/api/session", {**PAGE, "Origin": f"http://{OWN}"}),
    ("GET", "/ui/api/secrets", PAGE),
    ("DELETE", "/ui/api/leases/lse_x", {**PAGE, "Origin": f"http://{OWN}"}),
])
def test_own_page_passes(method: str, path: str, headers: dict[str, str]) -> None:
    """The page, its files and its own API calls pass, with or without fetch metadata."""
    assert guard(method, path, *headers.items()) is None


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("POST", "/ui/api/secrets", {"Origin": "http://127.0.0.1:80", "Sec-Fetch-Site": "same-site"}),
    ("POST", "/ui/api/secrets", {"Origin": "http://localhost:80", "Sec-Fetch-Site": "cross-site"}),
    ("POST", "/ui/api/secrets", {"Origin": "null"}),  # a sandboxed frame, a file: page
    ("POST", "/ui/api/secrets", {"Origin": f"http://localhost:{PORT}"}),  # Host says 127.0.0.1
    ("POST", "/ui/api/secrets", {"Origin": f"https://{OWN}"}),
    ("POST", "/ui/api/secrets", {"Origin": f"http://{OWN}/"}),
    ("GET", "/ui/api/secrets", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}),
    ("GET", "/ui/api/secrets", TYPED),  # `none` opens a page, never the API
    ("POST", "/ui/", TYPED),  # `none` is a GET navigation only
    ("GET", "/ui/", {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "no-cors"}),
    ("GET", "/ui/", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}),  # no Dest
    ("GET", "/ui/api/secrets", {**TYPED, "Sec-Fetch-Site": "cross-site",
                                "Sec-Fetch-Dest": "document"}),  # a link to the API
    ("POST", "/ui/", {**TYPED, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "document"}),
    ("GET", "/ui/", {**TYPED, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "iframe"}),
    ("GET", "/ui/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "iframe"}),
    ("GET", "/ui/", {"Sec-Fetch-Site": "Same-Origin"}),  # browsers send lower case only
])
def test_other_pages_are_refused(method: str, path: str, headers: dict[str, str]) -> None:
    """Another origin, even another loopback port, is refused whatever it asks for."""
    assert guard(method, path, *headers.items()) == "origin_not_allowed"


def test_a_header_twice_is_refused() -> None:
    """Two Origins, two Sec-Fetch-Sites or two Hosts: refused, whichever copy is good."""
    own = ("Origin", f"http://{OWN}")
    assert guard("POST", "/ui/api/secrets", own, own) == "origin_not_allowed"
    assert guard("GET", "/ui/api/secrets", ("Sec-Fetch-Site", "same-origin"),
                 ("Sec-Fetch-Site", "cross-site")) == "origin_not_allowed"
    assert guard("GET", "/ui/", ("Host", OWN)) == "host_header_refused"


@pytest.mark.parametrize("host", [None, "evil.example", f"evil.example:{PORT}", "127.0.0.1",
                                  "127.0.0.1:8000", f"127.0.0.2:{PORT}", f"0.0.0.0:{PORT}",
                                  f"127.0.0.1.nip.io:{PORT}"])
def test_host_must_be_loopback_with_the_daemons_port(host: str | None) -> None:
    """DNS rebinding: the Host must name loopback and the port the daemon listens on."""
    assert guard("GET", "/ui/", host=host) == "host_header_refused"


def test_localhost_and_ipv6_are_their_own_origins() -> None:
    """Opened as localhost or [::1], the page's Origin is that name, and must match it."""
    for name in ("localhost", "[::1]", "LOCALHOST"):
        host = f"{name}:{PORT}"
        assert guard("POST", "/ui/api/secrets", host=host,
                     Origin=f"http://{host.lower()}") is None
        assert guard("POST", "/ui/api/secrets", host=host,
                     Origin=f"http://{OWN}") == "origin_not_allowed"


def test_only_the_page_and_the_login_need_no_token() -> None:
    """Static files and POST /ui/api/session are open; the rest of /ui/api/ is not."""
    assert needs_no_token("GET", "/ui/")
    assert needs_no_token("GET", "/ui/app.js")
    assert needs_no_token("POST", "/ui/api/session")
    assert not needs_no_token("DELETE", "/ui/api/session")
    assert not needs_no_token("GET", "/ui/api/secrets")
    assert not needs_no_token("GET", "/ui/api/")
    assert not needs_no_token("GET", "/v1/health")
    assert not needs_no_token("GET", "/uiapp.js")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_login_code_works_once_and_for_60_seconds() -> None:
    """A code opens one session; used, unknown or older than 60 s it is refused."""
    clock = Clock()
    logins = Logins(clock)
    code, expires_at = logins.mint_code()
    assert expires_at == clock.now + 60
    token, session_expires = logins.redeem(code)
    assert token.startswith("sbs_") and len(token) > 40
    assert session_expires == clock.now + 15 * 60
    with pytest.raises(Unauthorized):
        logins.redeem(code)
    with pytest.raises(Unauthorized):
        logins.redeem("not-a-code")
    late, _ = logins.mint_code()
    clock.now += 60
    with pytest.raises(Unauthorized):
        logins.redeem(late)
    assert code not in repr(vars(logins)) and token not in repr(vars(logins))  # hashes only


def test_sessions_end_after_15_idle_minutes_or_8_hours() -> None:
    """Use keeps a session alive for 15 more minutes, but never past 8 h from its start."""
    clock = Clock()
    logins = Logins(clock)
    token, _ = logins.redeem(logins.mint_code()[0])
    digest = token_hash(token)
    clock.now += 14 * 60
    assert logins.touch(digest)
    clock.now += 14 * 60  # 28 minutes in, 14 since last use
    assert logins.touch(digest)
    clock.now += 15 * 60
    assert not logins.touch(digest)
    busy, _ = logins.redeem(logins.mint_code()[0])
    started = clock.now
    while clock.now < started + 8 * 3600 - 600:
        clock.now += 600
        assert logins.touch(token_hash(busy))
    clock.now = started + 8 * 3600
    assert not logins.touch(token_hash(busy))
    assert not logins.touch(token_hash("sbs_never-issued"))


def test_ending_a_session_stops_it_at_once() -> None:
    """Sign-out forgets the session; other sessions keep working."""
    logins = Logins(Clock())
    first, _ = logins.redeem(logins.mint_code()[0])
    second, _ = logins.redeem(logins.mint_code()[0])
    logins.end(first)
    assert not logins.touch(token_hash(first))
    assert logins.touch(token_hash(second))


def test_sessions_work_only_on_the_dashboard_api(tmp_path: Path) -> None:
    """A session token is refused off /ui/api/; the owner's token and socket are refused on it."""
    bootstrap = tmp_path / "broker.token"
    bootstrap.write_text("sbt_owner\n")
    auth = Authenticator(bootstrap)
    logins = Logins()
    auth.sessions = logins
    session, _ = logins.redeem(logins.mint_code()[0])
    assert auth.authenticate(session, "tcp", dashboard=True).kind == "session"
    assert auth.authenticate(session, "tcp", dashboard=True).consumer is None
    with pytest.raises(Unauthorized):
        auth.authenticate(session, "tcp")
    with pytest.raises(Unauthorized):
        auth.authenticate(session, "unix")
    assert auth.authenticate("sbt_owner", "tcp").kind == "owner"
    assert auth.authenticate(None, "unix").kind == "owner"
    with pytest.raises(Unauthorized):
        auth.authenticate("sbt_owner", "tcp", dashboard=True)
    with pytest.raises(Unauthorized):
        auth.authenticate(None, "unix", dashboard=True)
    with pytest.raises(Unauthorized):
        auth.authenticate("sbs_forged", "tcp", dashboard=True)
