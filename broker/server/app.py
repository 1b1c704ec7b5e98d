"""The broker daemon's wiring: the application and its routes, sockets, signals, and the
background jobs. Handlers live in v1.py, admin.py, gateway.py and ui.py; they find the
runtime state (state.py) on the application, set here, and never import this module.

One aiohttp application is served on two transports: the Unix socket (no token; its
0600 mode in a 0700 directory is the protection) and loopback TCP (a bearer token).
Middlewares (middlewares.py), outermost first: errors + request log, Host/Origin guard,
authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from broker import __version__
from broker.config import Config, load_config, worker_count
from broker.core import logs, netowner
from broker.core.clock import utc_day
from broker.core.errors import BrokerError, InsecureFile, UsageError
from broker.core.home import Home, check_private, open_private, private_dir
from broker.core.loopback import is_loopback_host
from broker.server import admin, gateway, hardening, ui, v1
from broker.server.access import Access
from broker.server.auth import Authenticator, SharedThrottle
from broker.server.middlewares import (
    API,
    CODE,
    PREFIX,
    SESSION,
    auth_middleware,
    errors_middleware,
    guard_middleware,
    secure_headers,
)
from broker.server.shared import Ledger, SharedBudgets, WorkersDB
from broker.server.state import (
    ACCESS,
    ADMIN,
    AUDIT,
    AUTH,
    CONFIG,
    SECRETS,
    SERVER,
    SERVICE,
    SPENDING,
    AuditRecorder,
    LiveConfig,
    SecretsCache,
    ServerInfo,
    Spending,
)
from broker.server.teams import TEAMS, ServedTeams
from broker.service.context import Context
from broker.service.team import Teams
from broker.store.metadata import Metadata

log = structlog.get_logger("broker")


def create_app(service: Context, config: LiveConfig, audit: AuditRecorder,
               listen: str, shared: WorkersDB | None = None, workers: int = 1
               ) -> web.Application:
    """The application with its state set under its keys and every route mounted;
    `shared`: the state one worker of several shares with the others."""
    app = web.Application(
        middlewares=[errors_middleware, guard_middleware, auth_middleware],
        client_max_size=config.config.max_body_bytes,
    )
    access = Access(service.home.grants, audit.record)
    auth = Authenticator(service.home.token)
    logins = app[ui.LOGINS] = ui.Logins() if shared is None else ui.SharedLogins(shared)
    if shared is not None:
        access.ledger = Ledger(shared)
    auth.sessions = logins  # a session token works on the dashboard's API only
    app[SERVICE] = service
    app[ADMIN] = service.as_actor("admin")
    app[AUDIT] = audit
    app[CONFIG] = config
    app[ACCESS] = access
    app[AUTH] = auth
    teams = app[TEAMS] = ServedTeams(service.home, Teams(service), access.secret_changed,
                                     audit.record_safely)
    teams.configure(config.config.teams)
    app[SECRETS] = SecretsCache(service, access, auth, teams)
    app[SPENDING] = Spending(service.metadata, None if shared is None else SharedBudgets(shared))
    app[SERVER] = ServerInfo(listen, workers)

    r = app.router
    r.add_get("/v1/health", v1.health)
    r.add_get("/v1/status", v1.status)
    r.add_get("/v1/grants", v1.my_grants)
    r.add_post("/v1/explain", v1.my_explain)
    r.add_post("/v1/mcp/tool-called", v1.mcp_tool_called)
    r.add_route("*", "/proxy/{tail:.*}", gateway.handle)
    r.add_post("/v1/leases", v1.create_lease)
    for prefix in ("/v1", API.rstrip("/")):  # the dashboard's API: the same handlers
        r.add_get(f"{prefix}/leases", v1.list_leases)
        r.add_delete(f"{prefix}/leases/{{lease_id}}", v1.revoke_lease)
    for prefix in ("/v1/admin", API.rstrip("/")):
        for method, path, handler in admin.ROUTES:
            r.add_route(method, prefix + path, handler)
        r.add_get(f"{prefix}/usage", v1.usage)
    r.add_get("/v1/usage", v1.usage)
    for path in ui.ASSETS:
        r.add_get(PREFIX + path, ui.asset)
    r.add_post(SESSION, ui.start_session)
    r.add_delete(SESSION, ui.end_session)
    r.add_post(CODE, ui.mint_code)
    app.on_response_prepare.append(secure_headers)
    app.on_startup.append(gateway.open_upstream)
    app.on_cleanup.append(gateway.close_upstream)
    return app


def parse_listen(listen: str, allow_remote: bool) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {listen!r}: use HOST:PORT, e.g. 127.0.0.1:18443")
    if not is_loopback_host(host):
        if not allow_remote:
            raise UsageError(
                f"refusing to listen on non-loopback address {host}: anyone who can reach it "
                "could try tokens; pass --allow-remote if you really mean it")
        log.warning("listen.non_loopback", host=host)
    return host, int(port_text)


def _bind_unix(path: Path) -> socket.socket:
    """Bind the socket in run/ (checked by `_take_pid_lock`): a stale socket there is replaced,
    anything else refused."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(found.st_mode):
            raise InsecureFile(f"{path} is not a socket; remove it (rm {path})")
        path.unlink()  # stale: we hold the pid lock, and no broker answers on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}{_held_by(port)}; is "
                          "another broker running? (secret-broker status) or pick --listen "
                          "HOST:PORT") from None
    return sock


def _answers(path: Path) -> bool:
    """Whether a process listens on the Unix socket at `path` (a stale one refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except TimeoutError:
            return True  # listening, its backlog full
        return True


def _held_by(port: int) -> str:
    """Who listens on a busy port, where the kernel shows it: another user may have taken
    it to collect the tokens that clients send there."""
    found = netowner.listener(netowner.read() or [], port)
    return "" if found is None else f" (held by {netowner.holder(found)})"


def _take_pid_lock(home: Home) -> int:
    """Lock the pid file; refuse while another broker holds it, or answers on the socket
    (its pid file deleted: the lock went with it)."""
    private_dir(home.run)
    fd = open_private(home.pid, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BrokerError(f"another broker is already running for {home.root} "
                          "(see `secret-broker status`)") from None
    if _answers(home.socket):
        os.close(fd)
        raise BrokerError(f"another broker is already running for {home.root}: it answers on "
                          f"{home.socket}, though {home.pid} was removed (see `secret-broker "
                          "status`)")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def serve(home: Home, *, listen: str | None = None, log_format: str | None = None,
          allow_remote: bool = False, environ: dict[str, str] | None = None,
          workers: int | str | None = None) -> int:
    """Run in the foreground until SIGTERM/SIGINT; exit 0 after a graceful stop."""
    logs.configure(log_format)
    hardening.apply()
    home.require()
    for path in (home.root, home.token, home.audit, home.vault, home.vault_key):
        check_private(path)
    config = load_config(home)
    count = worker_count(config.workers if workers is None else workers)  # both checked ≥ 1
    service = Context.open(home, environ, actor="broker", audit_fsync=config.audit_fsync)
    host, port = parse_listen(listen or config.listen, allow_remote)
    pid_fd = _take_pid_lock(home)
    bound: os.stat_result | None = None
    try:
        try:
            service.store.get("!instance-key")  # unlock once, now, and fail fast
        except BrokerError as exc:
            raise type(exc)(f"cannot start: {exc.message}") from None
        hardening.forget_passphrase()
        tcp = _bind_tcp(host, port)
        unix = _bind_unix(home.socket)
        bound = home.socket.lstat()
        socks, where = [unix, tcp], "{}:{}".format(*tcp.getsockname()[:2])
        if count == 1:
            return _run(_worker_app(service, config, where), socks)
        spend = service.metadata.token_spend(utc_day())
        service.session.close_metadata()  # no SQLite connection may cross the fork
        shared = home.run / "workers.db"
        WorkersDB.create(shared, spend)
        try:
            return _supervise(count, lambda: _run(_worker_app(
                Context(service.session.for_worker(), service.actor), config, where,
                WorkersDB(shared), count), socks))
        finally:
            WorkersDB.remove(shared)
    finally:
        if bound is not None:
            _remove_own_socket(home.socket, bound)
        os.close(pid_fd)


def _worker_app(service: Context, config: Config, listen: str,
                shared: WorkersDB | None = None, workers: int = 1) -> web.Application:
    audit = AuditRecorder(service, None if shared is None else SharedThrottle(shared))
    return create_app(service, LiveConfig(service.home, config, audit), audit, listen,
                      shared, workers)


def _supervise(count: int, work: Callable[[], int]) -> int:
    """Fork `count` workers that serve the sockets bound here, pass SIGTERM, SIGINT and
    SIGHUP on to them, and fork a new one for one that dies; return when all have stopped.
    A fifth death within 10 s stops the broker: a worker that cannot run would loop."""
    stopping = False
    children: set[int] = set()
    deaths: list[float] = []

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = work()
            except BaseException as exc:  # the type only: no value in a log
                log.error("worker.failed", error=type(exc).__name__)
            finally:
                os._exit(code)  # never the supervisor's cleanup: its files are not ours
        children.add(pid)
        if stopping:  # a stop signal came between the fork and the line above
            os.kill(pid, signal.SIGTERM)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for _ in range(count):
        spawn()
    log.info("broker.workers", count=count, pids=sorted(children))
    code = 0
    while children:
        pid, status = os.wait()
        if pid not in children:
            continue
        children.remove(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            code = code or (exit_code if exit_code > 0 else 0)
            continue
        log.error("worker.died", pid=pid, exit=exit_code)
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < 10.0] + [now]
        if len(deaths) >= 5:
            log.error("broker.stopping", reason="workers keep dying; see the log above")
            code = 1
            forward(signal.SIGTERM, None)
        else:
            spawn()
    return code


def _remove_own_socket(path: Path, bound: os.stat_result) -> None:
    """Unlink the socket this daemon bound, never another one now at that path (a newer
    broker's, after ours was removed)."""
    with contextlib.suppress(FileNotFoundError):
        now = path.lstat()
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            path.unlink()


def _run(app: web.Application, socks: list[socket.socket]) -> int:
    try:
        import uvloop

        runner_factory: Any = uvloop.new_event_loop
    except ImportError:
        runner_factory = None
    with asyncio.Runner(loop_factory=runner_factory) as runner:
        return runner.run(_main(app, socks))


def _reload(app: web.Application, why: str) -> None:
    """SIGHUP: the grants file and config.toml, each kept as it was if the new one fails."""
    app[ACCESS].reload(why)
    app[CONFIG].reload(why)
    app[TEAMS].configure(app[CONFIG].config.teams)
    app[TEAMS].refresh_soon()


async def _main(app: web.Application, socks: list[socket.socket]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    service, audit, cache = app[SERVICE], app[AUDIT], app[SECRETS]
    app[ACCESS].reload("startup")
    await app[TEAMS].refresh(force=True)  # verified before the first request
    cache.refresh()
    # aiohttp's keep-alive timer runs from a connection's start (and from each response's
    # end) until a request's headers are complete: it is the header-read timeout too.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           access_log=None, shutdown_timeout=30.0,
                           keepalive_timeout=app[CONFIG].config.header_timeout_secs)
    await runner.setup()
    gc.freeze()  # start-up objects live forever: keep them out of every collection
    for sock in socks:
        await web.SockSite(runner, sock, backlog=1024).start()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(app, "SIGHUP"))
    audit.record("broker.started", pid=os.getpid(), backend=service.backend)
    log.info("broker.started", listen=app[SERVER].listen, socket=str(service.home.socket),
             pid=os.getpid(), version=__version__)
    usage_db = Metadata(service.home.metadata)  # the flush thread's own connection
    flush_usage = app[SPENDING].flush_usage
    background = [asyncio.create_task(_every(0.1, lambda: _flush_audit(service))),
                  asyncio.create_task(_every(1.0, lambda: _in_thread(flush_usage, usage_db))),
                  asyncio.create_task(_every(1.0, lambda: _housekeeping(app)))]
    await stop.wait()
    log.info("broker.stopping")
    await runner.cleanup()  # stops accepting, lets in-flight requests finish (30 s at most)
    for task in background:
        task.cancel()
    cache.flush_last_used()
    flush_usage(usage_db)
    audit.flush_refusals(everything=True)
    with contextlib.suppress(BrokerError):
        audit.record("broker.stopped", pid=os.getpid())
    service.audit_log.close()
    log.info("broker.stopped")
    return 0


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception as exc:
            log.error("background.failed", error=type(exc).__name__, detail=str(exc)[:200])


async def _in_thread(job: Callable[..., None], *args: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, job, *args)


async def _flush_audit(service: Context) -> None:
    if service.audit_log.pending:  # an idle broker wakes no thread (and takes no GIL)
        await _in_thread(service.audit_log.flush)


async def _housekeeping(app: web.Application) -> None:
    app[ACCESS].reload_if_changed()
    await app[TEAMS].refresh()  # a stat of the git refs; a new commit is read and verified
    app[AUTH].reread()  # broker.token edited by hand (`token rotate` is noticed at once)
    cache = app[SECRETS]
    cache.refresh()
    cache.end_leases_of_dead_tokens()  # tokens expire without any commit to notice
    cache.flush_last_used()
    app[AUDIT].flush_refusals()
