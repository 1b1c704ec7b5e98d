"""The dashboard: a loopback page for the owner, safe against every other local page.

- The page is static (`broker/ui/`): it holds no data, so loading it needs no token.
- `secret-broker ui` asks the daemon over the Unix socket for a one-time login code
  (`POST /v1/admin/ui/code`, owner only); the page trades it at `POST /ui/api/session`
  for a session token (`sbs_…`). Codes and sessions are kept as SHA-256, in this
  process (or, with several workers, in run/workers.db).
- `/ui/api/…` are the admin routes of §11 and the lease routes, mounted again; there only
  a session token works, and a session token works nowhere else (`Authenticator`).
- The guard every `/ui/` request passes before authentication, and the headers every
  `/ui/` response carries, are in `middlewares.py`.

No cookies: browsers send loopback cookies to every local port, so any local page could
ride them. The session token lives in the tab's `sessionStorage` and goes in a header that
no other page can make the browser send.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

from aiohttp import web

from broker.core import netowner
from broker.core.clock import rfc3339
from broker.core.digest import token_hash
from broker.core.errors import Unauthorized, UsageError
from broker.core.loopback import LOOPBACK_NAMES
from broker.server.auth import presented_token
from broker.server.inputs import json_body
from broker.server.middlewares import PREFIX
from broker.server.shared import WorkersDB
from broker.server.state import AUDIT, SERVER
from broker.service.tokens import new_token

SESSION_PREFIX = "sbs_"
LOGIN_LIMIT = 1024  # bytes of a login's body: `{"code": "…"}` needs under a hundred
ASSETS = {  # path under /ui/ -> (file in broker/ui/, content type)
    "": ("index.html", "text/html"),
    "app.js": ("app.js", "text/javascript"),
    "style.css": ("style.css", "text/css"),
    "icon.svg": ("icon.svg", "image/svg+xml"),
}


# --- login codes and sessions ---------------------------------------------------------------


@dataclass
class _Session:
    started: float
    last_used: float


class Logins:
    """One-time login codes and the sessions they open, in memory only, kept as SHA-256.

    A code lives 60 s and opens one session; a session ends after 15 min unused or 8 h
    after it started, whichever comes first.
    """

    CODE_TTL = 60.0
    IDLE = 15 * 60.0
    LIFETIME = 8 * 3600.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._codes: dict[str, float] = {}  # sha256(code) -> expires_at
        self._sessions: dict[str, _Session] = {}  # sha256(token) -> session

    def mint_code(self) -> tuple[str, float]:
        """A new login code and when it expires."""
        self._prune()
        code = new_token("")
        expires_at = self._clock() + self.CODE_TTL
        self._codes[token_hash(code)] = expires_at
        return code, expires_at

    def redeem(self, code: str) -> tuple[str, float]:
        """Trade a code (once) for a session token; return the token and its expiry."""
        self._prune()
        # pop: a code is spent by its first use, whatever happens next
        if self._codes.pop(token_hash(code), None) is None:
            raise Unauthorized("unknown, used or expired login code: run `secret-broker ui` "
                               "for a new one")
        token = new_token(SESSION_PREFIX)
        now = self._clock()
        session = self._sessions[token_hash(token)] = _Session(now, now)
        return token, self._expiry(session)

    def touch(self, digest: str) -> bool:
        """Is the session with this token hash live? Using it counts as activity."""
        session = self._sessions.get(digest)
        now = self._clock()
        if session is None or now >= self._expiry(session):
            self._sessions.pop(digest, None)
            return False
        session.last_used = now
        return True

    def end(self, token: str) -> None:
        self._sessions.pop(token_hash(token), None)

    def _expiry(self, session: _Session) -> float:
        return min(session.last_used + self.IDLE, session.started + self.LIFETIME)

    def _prune(self) -> None:
        now = self._clock()
        self._codes = {h: t for h, t in self._codes.items() if now < t}
        self._sessions = {h: s for h, s in self._sessions.items() if now < self._expiry(s)}


class SharedLogins(Logins):
    """`Logins` for several workers, in run/workers.db: a code minted by one worker is
    redeemed at another, once, and a session works on all of them."""

    def __init__(self, db: WorkersDB, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._db = db

    def mint_code(self) -> tuple[str, float]:
        code, now = new_token(""), self._clock()
        with self._db.transaction() as c:
            c.execute("DELETE FROM codes WHERE expires_at <= ?", (now,))
            c.execute("INSERT INTO codes VALUES (?, ?)", (token_hash(code), now + self.CODE_TTL))
        return code, now + self.CODE_TTL

    def redeem(self, code: str) -> tuple[str, float]:
        token, now = new_token(SESSION_PREFIX), self._clock()
        with self._db.transaction() as c:
            if not c.execute("DELETE FROM codes WHERE digest = ? AND expires_at > ?",
                             (token_hash(code), now)).rowcount:
                raise Unauthorized("unknown, used or expired login code: run `secret-broker "
                                   "ui` for a new one")
            c.execute("INSERT INTO sessions VALUES (?, ?, ?)", (token_hash(token), now, now))
        return token, self._expiry(_Session(now, now))

    def touch(self, digest: str) -> bool:
        now = self._clock()
        with self._db.transaction() as c:
            live = c.execute("UPDATE sessions SET last_used = ? WHERE digest = ? AND "
                             "last_used + ? > ? AND started + ? > ?",
                             (now, digest, self.IDLE, now, self.LIFETIME, now)).rowcount
            if not live:
                c.execute("DELETE FROM sessions WHERE digest = ?", (digest,))
        return bool(live)

    def end(self, token: str) -> None:
        with self._db.transaction() as c:
            c.execute("DELETE FROM sessions WHERE digest = ?", (token_hash(token),))


# --- handlers -------------------------------------------------------------------------------

LOGINS: web.AppKey[Logins] = web.AppKey("logins", Logins)


def own_origin(listen: str) -> str:
    """`http://HOST:PORT` of the daemon's TCP listener (127.0.0.1 unless that is loopback)."""
    host, _, port = listen.rpartition(":")
    host = f"[{host}]" if ":" in host else host  # getsockname() gives IPv6 bare
    return f"http://{host if host in LOOPBACK_NAMES else '127.0.0.1'}:{port}"


async def asset(request: web.Request) -> web.Response:
    name, content_type = ASSETS[request.path.removeprefix(PREFIX)]
    body = (files("broker.server") / "ui" / name).read_bytes()
    return web.Response(body=body, content_type=content_type, charset="utf-8")


async def mint_code(request: web.Request) -> web.Response:
    """For `secret-broker ui` (owner only): a one-time code and the URL that carries it."""
    request.app[AUDIT].record("ui.code_issued")  # no audit, no code
    code, expires_at = request.app[LOGINS].mint_code()
    url = f"{own_origin(request.app[SERVER].listen)}{PREFIX}#code={code}"
    return web.json_response({"code": code, "expires_at": rfc3339(expires_at), "url": url})


async def start_session(request: web.Request) -> web.Response:
    """The page trades its login code (once) for a session token."""
    audit = request.app[AUDIT]
    body = await json_body(request, LOGIN_LIMIT)
    code = body.get("code")
    if set(body) != {"code"} or not isinstance(code, str):
        raise UsageError('send {"code": "…"}, the code from `secret-broker ui`')
    if not _from_owner(request):
        await audit.refuse(request, "auth.failed", "login_code_peer_uid", 401)
        raise Unauthorized("a login code is taken only from a program of the user the broker "
                           "runs as: open the dashboard as that user")
    try:
        token, expires_at = request.app[LOGINS].redeem(code)
    except Unauthorized:
        await audit.refuse(request, "auth.failed", "login_code", 401)
        raise
    audit.record("ui.session_started", peer=request.remote)
    return web.json_response({"token": token, "expires_at": rfc3339(expires_at)})


def _from_owner(request: web.Request) -> bool:
    """Does the request come over the Unix socket (0600), or over a loopback connection whose
    other end belongs to the broker's own uid (where the kernel shows it: Linux)?
    Another local user who got hold of a code cannot trade it."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(peer, tuple) or not isinstance(local, tuple):
        return True
    return netowner.far_end_uid(local, peer) in (None, os.getuid())


async def end_session(request: web.Request) -> web.Response:
    """Sign out: the session token stops working at once."""
    token = presented_token(request.headers, ("authorization",))
    if token is not None:  # always: the auth middleware let only a session token in
        request.app[LOGINS].end(token)
    request.app[AUDIT].record("ui.session_ended", peer=request.remote)
    return web.json_response({"ended": True})
