"""`secret-broker`: thin commands over the service layer; `main()` maps errors to exit codes.

Heavy modules (aiohttp, keyring, structlog) are imported inside the commands that need
them, so `list` or `exec` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from broker import __version__
from broker.cli.common import EXIT_CODES, JSON
from broker.cli.common import context as _context
from broker.cli.common import print_json as _print_json
from broker.cli.common import print_table as _print_table
from broker.cli.common import read_value as _read_value
from broker.config import load_config
from broker.core.errors import BrokerError, UsageError
from broker.core.home import Home, open_private, private_dir, without_broker_vars
from broker.core.text import printable

if TYPE_CHECKING:
    from broker.service.secrets import Secrets

def _secrets(args: argparse.Namespace) -> Secrets:
    from broker.service.secrets import Secrets

    return Secrets(_context(args))


def _read_text(path: str) -> str:
    """An input file named on the command line, exactly as written (CRLF stays CRLF)."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


# --- commands -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from broker.service.new_home import init_home

    result = init_home(Home.from_env(), args.backend)
    if not result.created:
        print(f"secret-broker home {result.home.root} already exists (backend: {result.backend});"
              " nothing was changed")
        return 0
    print(f"created {result.home.root}")
    print(f"backend: {result.backend} ({result.why})")
    if result.key_file:
        print(f"key file: {result.home.vault_key} (0600)\n"
              "  It protects copies of vault/ (a backup, a git commit) made without the key file."
              "\n  It does not protect against anyone who can read this home directory: they can "
              "read the key file too.\n  For that, re-create the home with a passphrase "
              "(SECRET_BROKER_PASSPHRASE_FILE) or use an OS keychain.")
    print(f"grants: {result.home.grants} (every example grant is commented out: "
          "nothing is allowed yet)")
    print("next: secret-broker add @openai_api_key --provider openai --kind api_key --stdin")
    return 0


def _meta_rows(metas: Sequence[Any]) -> list[list[object]]:
    return [[m.ref, m.provider, m.kind, m.backend, m.fingerprint, m.version, m.created_at,
             m.rotated_at, m.last_used_at] for m in metas]


_META_HEADER = ("REF", "PROVIDER", "KIND", "BACKEND", "FINGERPRINT", "VERSION", "CREATED",
                "ROTATED", "LAST USED")


def cmd_add(args: argparse.Namespace) -> int:
    service = _secrets(args)
    from broker.core.refs import parse_ref

    parse_ref(args.ref)
    service.ctx.metadata.require_absent(parse_ref(args.ref))  # refuse before prompting for a value
    meta = service.add(args.ref, args.provider, args.kind,
                       _read_value(args, f"Value for {args.ref}: "))
    print(f"added @{meta.ref} ({meta.provider} {meta.kind}, {meta.backend}, {meta.fingerprint})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    service = _secrets(args)
    metas = service.all()
    if not args.refs and service.ctx.session.config.teams:  # teams: read from git, verified
        from broker.service.team import Teams

        team_metas, problems = Teams(service.ctx).metas()
        metas += team_metas
        for problem in problems:
            print(f"secret-broker: warning: {problem}", file=sys.stderr)
    if args.refs:  # for shell completion: names from metadata.db only; never unlocks
        for meta in metas:
            print(meta.ref)
    elif args.json:
        _print_json({"secrets": [m.as_json() for m in metas]})
    elif metas:
        _print_table(_meta_rows(metas), _META_HEADER)
    else:
        print("no secrets yet; add one with: secret-broker add @NAME --provider P --kind K --stdin")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from broker.core.refs import parse_ref

    service = _secrets(args)
    ref = parse_ref(args.ref)
    doc: dict[str, object]
    if service.ctx.session.config.teams and service.ctx.metadata.find(ref) is None:
        from broker.service.team import Teams

        doc = Teams(service.ctx).describe(ref)
    else:
        doc = service.inspect(args.ref).as_json()
    if args.json:
        _print_json(doc)
    else:
        for key, value in doc.items():
            print(f"{key + ':':14} {'-' if value is None else value}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    service = _secrets(args)
    service.inspect(args.ref)  # a missing ref fails before prompting
    meta = service.rotate(args.ref, _read_value(args, f"New value for {args.ref}: "))
    print(f"rotated @{meta.ref} to version {meta.version} ({meta.fingerprint})")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    meta = _secrets(args).remove(args.ref)
    print(f"removed @{meta.ref}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from broker.service.envfile import env_uses, parse_env_file, parse_env_flag
    from broker.service.launch import Launch
    from broker.service.template import render

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("nothing to run: secret-broker exec --env VAR=@ref -- CMD ARGS")
    if args.profile is not None and (args.env or args.env_file):
        raise UsageError("--profile brings its own environment; use it without --env/--env-file")
    templates = parse_env_file(_read_text(args.env_file), args.env_file) if args.env_file else {}
    templates.update(parse_env_flag(item) for item in args.env)  # flags win over the file
    launch = Launch(_context(args))
    consumer = None
    if args.profile is not None:
        profile = launch.authorized_profile(args.profile)
        templates, consumer = profile.templates(), profile.consumer
    uses = env_uses(templates)
    values = launch.resolve_for(uses, "secret.exec", consumer, env=uses)
    env = without_broker_vars(os.environ)  # only the variables asked for reach the child
    env.update((name, render(template, values)) for name, template in templates.items())
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 - exec replaces us, by design
    except FileNotFoundError:
        raise UsageError(f"command not found: {command[0]}") from None
    except PermissionError:
        raise UsageError(f"command not executable: {command[0]}") from None
    return 1  # not reached: exec replaces this process


def cmd_inject(args: argparse.Namespace) -> int:
    from broker.service.launch import Launch
    from broker.service.template import TemplateError, find_refs, render

    template = _read_text(args.input)
    try:
        refs = find_refs(template)
    except TemplateError as exc:
        raise UsageError(f"{args.input}: {exc}") from None
    write = _inject_target(args)  # refused targets are refused before anything is resolved
    write(render(template, Launch(_context(args)).resolve_for(refs, "secret.injected")).encode())
    return 0


def _inject_target(args: argparse.Namespace) -> Callable[[bytes], None]:
    """Where inject writes: -o FILE (0600, atomic), --out-fd N, or stdout; never a terminal."""
    from broker.core.home import write_private

    if args.output is not None:
        path = Path(args.output)
        exists = f"{path} exists; nothing was written (pass --force to replace it)"
        if os.path.lexists(path) and not args.force:
            raise BrokerError(exists)

        def to_file(data: bytes) -> None:
            try:
                write_private(path, data, replace=args.force)
            except FileExistsError:
                raise BrokerError(exists) from None  # it appeared since it was checked
            except OSError as exc:
                raise BrokerError(f"cannot write {path}: {exc.strerror or exc}") from None

        return to_file
    fd, where = (sys.stdout.fileno(), "stdout") if args.out_fd is None else (
        args.out_fd, f"--out-fd {args.out_fd}")
    try:
        os.fstat(fd)
    except OSError:
        raise UsageError(f"{where} is not an open file descriptor") from None
    if os.isatty(fd):
        raise UsageError(f"{where} is a terminal, and secret values are not shown on one; "
                         "use -o FILE, --out-fd N or a pipe")

    def to_fd(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return to_fd


def cmd_audit(args: argparse.Namespace) -> int:
    if args.ref == "verify":
        return _audit_verify(args)
    if args.reseal:
        raise UsageError("--reseal goes with `audit verify`")
    from broker.service.queries import Queries

    events = Queries(_context(args)).audit_events(ref=args.ref, event=args.event, since=args.since)
    if args.json:
        _print_json({"events": events})
        return 0
    skip = {"ts", "seq", "event", "actor", "prev", "mac"}
    rows = [[e.get("ts"), e.get("seq"), e.get("event"), e.get("actor"),
             " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)] for e in events]
    _print_table(rows, ("TIME", "SEQ", "EVENT", "ACTOR", "DETAILS"))
    if not events:
        print(_no_events(args), file=sys.stderr)
    return 0


def _no_events(args: argparse.Namespace) -> str:
    """Why the table is empty, so `audit tail` (a ref, not a command) does not look like a
    quiet log."""
    asked = [f"@{args.ref.removeprefix('@')}"] if args.ref else []
    asked += [f"--event {args.event}"] if args.event else []
    asked += [f"--since {args.since}"] if args.since else []
    if not asked:
        return "no audit events yet"
    hint = "" if args.ref is None or args.ref.startswith("@") else (
        "; `audit` takes @REF to filter by, or `verify`")
    return f"no audit events match {' '.join(asked)}{hint}"


def _audit_verify(args: argparse.Namespace) -> int:
    from broker.service.queries import Queries

    queries = Queries(_context(args))
    verdict = queries.reseal_audit() if args.reseal else queries.verify_audit()
    if args.json:
        _print_json(verdict.as_json())
    elif verdict.ok:
        print(f"audit log OK: {verdict.checked} events, chain and seals intact")
    else:
        print(f"audit log BROKEN at line {verdict.first_bad_line}: {verdict.reason}",
              file=sys.stderr)
    return 0 if verdict.ok else 1


def cmd_grants_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from broker.cli.check import purpose_warnings
    from broker.gateway.providers import BUILTIN, build_providers
    from grants import load_grants
    from grants.render import grants_as_rows

    home = Home.from_env()
    path = Path(args.file) if args.file else home.grants
    if not path.exists():
        raise BrokerError(f"{path} does not exist (a missing grants file denies everything)")
    grants = load_grants(path)
    rows = grants_as_rows(grants)
    profiles = _profiles_beside(path)
    try:
        providers = build_providers(load_config(home).providers)
    except BrokerError:  # no home, or a broken config.toml (`check` reports that)
        providers = BUILTIN
    warnings = purpose_warnings(grants, providers, path)
    if args.json:
        _print_json({"file": str(path), "valid": True, "grants": rows,
                     "warnings": [w.as_json() for w in warnings]}
                    | ({} if profiles is None else {"profiles": profiles}))
        return 0
    for w in warnings:
        print(f"warning: {w.message}\n    fix: {w.fix}", file=sys.stderr)
    print(f"{path}: valid, {len(rows)} grant(s)")
    if rows:
        _print_table([[r["index"], r["line"], "@" + str(r["secret_ref"]), r["consumer"],
                       ",".join(r["purposes"]), ",".join(r["delivery"]),  # type: ignore[arg-type]
                       ",".join(r["allowed_hosts"]), r["ttl_secs"]]  # type: ignore[arg-type]
                      for r in rows],
                     ("#", "LINE", "SECRET", "CONSUMER", "PURPOSES", "DELIVERY", "HOSTS", "TTL"))
    if profiles is not None:
        print(f"{profiles['file']}: valid, {profiles['count']} profile(s)")
    return 0


def _profiles_beside(grants_file: Path) -> dict[str, object] | None:
    """The home's profiles.toml beside the grants file, validated; None when there is none."""
    from broker.service.profiles import load_profiles

    path = grants_file.with_name("profiles.toml")
    if not path.exists():
        return None
    return {"file": str(path), "valid": True, "count": len(load_profiles(path))}


def cmd_grants_explain(args: argparse.Namespace) -> int:
    from grants import AccessRequest, decide, load_grants
    from grants.render import explain_as_json

    doc = explain_as_json(decide(load_grants(Home.from_env().grants), AccessRequest(
        args.consumer, args.secret, args.purpose, args.delivery, args.host)))
    if args.json:
        _print_json(doc)
    else:
        print(f"{doc['decision']}: {doc['reason']}")
    return 0 if doc["decision"] == "allow" else 4


def cmd_usage(args: argparse.Namespace) -> int:
    from broker.service.queries import Queries

    rows = Queries(_context(args)).usage(since=args.since, by=args.by)
    if args.json:
        _print_json([r.as_json() for r in rows])
        return 0
    dims = [d for d in ("consumer", "provider", "model", "route", "day")
            if any(getattr(r, d) is not None for r in rows)] or ["consumer"]
    _print_table([[getattr(r, d) for d in dims] + [r.requests, r.errors, r.input_tokens,
                                                   r.output_tokens] for r in rows],
                 [d.upper() for d in dims] + ["REQUESTS", "ERRORS", "IN TOKENS", "OUT TOKENS"])
    if not rows:
        print("no proxied requests recorded " + (f"since {args.since}" if args.since else "yet"),
              file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.server.app import serve

    return serve(Home.from_env(), listen=args.listen, log_format=args.log_format,
                 allow_remote=args.allow_remote, workers=args.workers)


def cmd_start(args: argparse.Namespace) -> int:
    from broker.cli.lifecycle import start

    return start(Home.from_env(), listen=args.listen, timeout=args.timeout, workers=args.workers)


def cmd_stop(args: argparse.Namespace) -> int:
    from broker.cli.lifecycle import stop

    return stop(Home.from_env(), timeout=args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    from broker.cli.lifecycle import status

    return status(Home.from_env(), as_json=args.json)


def cmd_ui(args: argparse.Namespace) -> int:
    from broker.client import BrokerClient

    home = Home.from_env()
    doc = BrokerClient(socket_path=home.socket).request("POST", "/v1/admin/ui/code")
    if not args.print and _open_browser(_login_page(home, doc["url"], doc["expires_at"])):
        note = "opened the dashboard in your browser; its login link works once"
    else:
        print(doc["url"])
        note = "open this link in a browser on this machine; it works once"
    print(f"{note}, until {doc['expires_at']}", file=sys.stderr)
    return 0


LOGIN_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="0;url={url}"><title>secret-broker</title></head>
<body><p><a href="{url}">Open the secret-broker dashboard</a></p></body></html>
"""


def _login_page(home: Home, url: str, expires_at: str) -> str:
    """A page of the owner's that sends the browser on to `url`, as a file: URI.

    Every local user can read a browser's command line (/proc/PID/cmdline), so the login
    link goes in a new 0600 file in the private run/ directory instead. Its mtime is set
    to the code's expiry, and pages past it are deleted here, the next time.
    """
    import html
    import secrets

    from broker.core.clock import parse_rfc3339

    private_dir(home.run)
    now = time.time()
    for old in home.run.glob("ui-*.html"):
        with contextlib.suppress(FileNotFoundError):
            if old.lstat().st_mtime < now:
                old.unlink()
    path = home.run / f"ui-{secrets.token_urlsafe(12)}.html"
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as page:
        page.write(LOGIN_PAGE.format(url=html.escape(url)))
        expiry = parse_rfc3339(expires_at) or now
        os.utime(page.fileno(), (expiry, expiry))
    return path.as_uri()


def _open_browser(url: str) -> bool:
    """A graphical browser where there is a display (a console one would take the terminal)."""
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def cmd_token_rotate(args: argparse.Namespace) -> int:
    from broker.service.tokens import Tokens

    Tokens(_context(args)).rotate_bootstrap()
    print("rotated the bootstrap token; the old one no longer works "
          "(a running broker picks the new one up at once)")
    return 0


def _token_rows(tokens: Sequence[Any]) -> list[list[object]]:
    return [[t.id, t.consumer, t.description, t.created_at, t.expires_at, t.last_used_at,
             t.revoked_at] for t in tokens]


def cmd_token_create(args: argparse.Namespace) -> int:
    from broker.service.tokens import Tokens

    meta, token = Tokens(_context(args)).create(args.consumer, args.ttl, args.description,
                                                args.daily_tokens)
    if args.json:
        _print_json({**meta.as_json(), "token": token})
    else:
        print(token)
        print(f"created {meta.id} for consumer {meta.consumer}"
              + (f", expires {meta.expires_at}" if meta.expires_at else "")
              + "; this is the only time the token is shown", file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from broker.service.tokens import Tokens

    tokens = Tokens(_context(args)).all()
    if args.json:
        _print_json({"tokens": [t.as_json() for t in tokens]})
    else:
        _print_table(_token_rows(tokens), ("ID", "CONSUMER", "DESCRIPTION", "CREATED",
                                           "EXPIRES", "LAST USED", "REVOKED"))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.consumer is None):
        raise UsageError("name a token id or --consumer NAME (one of them)")
    from broker.service.tokens import Tokens

    revoked = Tokens(_context(args)).revoke(token_id=args.id, consumer=args.consumer)
    print(f"revoked {len(revoked)} token(s): {', '.join(t.id for t in revoked) or '-'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from broker.service.transfer import export_home, read_passphrase

    write = _inject_target(args)  # a terminal or an existing file is refused before any read
    ctx = _context(args)
    passphrase = read_passphrase(os.environ, confirm=True) if args.passphrase else None
    data, manifest = export_home(ctx, recipients=args.to or [], passphrase=passphrase,
                                 with_grants=args.with_grants)
    write(data)
    carried = [k for k in ("grants", "profiles") if getattr(manifest, k) is not None]
    print(f"exported {len(manifest.secrets)} secret(s)"
          + (f" and {' and '.join(carried)}" if carried else "")
          + f" to {args.output or 'the output'}", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from broker.service.transfer import import_home, open_export, read_export

    ctx = _context(args)
    blob, source = read_export(args.file)
    manifest = open_export(blob, source, env=os.environ,
                           identity=None if args.identity is None else Path(args.identity))
    done = import_home(ctx, manifest, replace=args.replace, with_grants=args.with_grants)
    print(f"imported {len(done.secrets)} secret(s) into the {ctx.backend} store"
          + "".join(f"\n  @{m.ref} (version {m.version})" for m in done.secrets))
    for path in done.files:
        print(f"restored {path}")
    if done.left_out:
        print(f"the export also carries {' and '.join(done.left_out)}; add --with-grants "
              "to restore them", file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from broker.cli import check as doctor

    home = Home.from_env()
    home.require()
    for done in doctor.fix_modes(home) if args.fix else []:
        print(f"fixed: {done}", file=sys.stderr)
    findings = sorted(doctor.run(doctor.Scene(home)), key=lambda f: f.severity != "error")
    errors = [f for f in findings if f.severity == "error"]
    if args.json:
        _print_json({"errors": [f.as_json() for f in errors],
                     "warnings": [f.as_json() for f in findings if f.severity == "warning"]})
    else:
        for f in findings:
            print(f"{f.severity}: {f.check}: {f.message}\n    fix: {f.fix}")
        print(f"{len(errors)} error(s), {len(findings) - len(errors)} warning(s)")
    return 1 if errors else 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from broker.cli.mcp import serve

    return serve(os.environ)


def cmd_completions(args: argparse.Namespace) -> int:
    from broker.cli.completions import render

    sys.stdout.write(render(args.shell, build_parser()))
    return 0


# --- parsing --------------------------------------------------------------------------------


def _add_output_options(sp: argparse.ArgumentParser) -> None:
    """-o FILE | --out-fd N, and --force: the targets `_inject_target` writes to."""
    target = sp.add_mutually_exclusive_group()
    target.add_argument("-o", "--output", metavar="FILE",
                        help="created 0600 via a temp file; an existing file needs --force")
    target.add_argument("--out-fd", type=int, metavar="N", help="write to this open descriptor")
    sp.add_argument("--force", action="store_true", help="replace an existing -o FILE")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="secret-broker", epilog=EXIT_CODES, formatter_class=argparse.RawTextHelpFormatter,
        description="Keep API keys out of config, env and prompts; broker them to local programs.",
    )
    p.add_argument("--version", action="version", version=f"secret-broker {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
                parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_,
                                                        epilog=EXIT_CODES)
        sp.set_defaults(func=fn)
        return sp

    sp = command("init", cmd_init, "create the home, config, token, grants file and store")
    sp.add_argument("--backend", choices=("keychain", "file-vault"),
                    help="default: a keychain that answers, else a key-file vault")

    sp = command("add", cmd_add, "store a new secret (value from --stdin or a hidden prompt)")
    sp.add_argument("ref", help="@ref: 1 to 128 of A-Z a-z 0-9 _ . -")
    sp.add_argument("--provider", required=True, help="openai, google, anthropic, ...")
    sp.add_argument("--kind", required=True, help="api_key, token, ...")
    sp.add_argument("--stdin", action="store_true", help="read the value from standard input")

    sp = command("list", cmd_list, "list secrets (metadata only)")
    sp.add_argument("--json", action="store_true", help=JSON)
    sp.add_argument("--refs", action="store_true", help=argparse.SUPPRESS)

    sp = command("inspect", cmd_inspect, "show one secret's metadata")
    sp.add_argument("ref", help="@ref")
    sp.add_argument("--json", action="store_true", help=JSON)

    sp = command("rotate", cmd_rotate, "replace a secret's value")
    sp.add_argument("ref", help="@ref")
    sp.add_argument("--stdin", action="store_true", help="read the value from standard input")

    sp = command("remove", cmd_remove, "delete a secret's value and metadata")
    sp.add_argument("ref", help="@ref")

    sp = command("exec", cmd_exec, "run a command with secrets in its environment only")
    sp.add_argument("--env", action="append", default=[], metavar="VAR=@ref",
                    help="set VAR in the child from a secret or a template (repeatable)")
    sp.add_argument("--env-file", metavar="FILE",
                    help="VAR=@ref, VAR=${{ secrets.NAME }} or VAR=value lines; --env wins")
    sp.add_argument("--profile", metavar="NAME",
                    help="[profiles.NAME] of profiles.toml; its consumer needs env grants")
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="the program to run and its arguments")

    sp = command("inject", cmd_inject,
                 "render ${{ secrets.NAME }} and {{ @ref }} in a template to a file, fd or pipe")
    sp.add_argument("-i", "--input", required=True, metavar="TEMPLATE", help="the template file")
    _add_output_options(sp)

    sp = command("audit", cmd_audit, "show the audit trail; `audit verify` checks its chain")
    sp.add_argument("ref", nargs="?", help="@ref to filter by, or `verify`")
    sp.add_argument("--since", help="30m, 12h, 7d or an RFC 3339 time")
    sp.add_argument("--event", help="event name, or a prefix ending in '.' (secret.)")
    sp.add_argument("--json", action="store_true", help=JSON)
    sp.add_argument("--reseal", action="store_true",
                    help="with `verify`: trust the log as it is now and seal a new checkpoint "
                         "at its end (after an upgrade, or once a reported cut is explained)")

    grants = sub.add_parser("grants", help="grants file tools").add_subparsers(
        dest="grants_command", required=True, metavar="SUBCOMMAND")
    sp = command("check", cmd_grants_check, "validate a grants file and print its grants",
                 grants)
    sp.add_argument("file", nargs="?", help="default: the home's secrets.grants.toml")
    sp.add_argument("--json", action="store_true", help=JSON)
    sp = command("explain", cmd_grants_explain, "would a grant allow this? (exit 0 allow, 4 deny)",
                 grants)
    sp.add_argument("--consumer", required=True, help="the consumer asking")
    sp.add_argument("--secret", required=True, help="@ref")
    sp.add_argument("--purpose", help="llm.chat, llm.embeddings, llm.rerank, ...")
    sp.add_argument("--delivery", required=True, help="native, http_header_inject or env")
    sp.add_argument("--host", help="the upstream host the value is for")
    sp.add_argument("--json", action="store_true", help=JSON)

    sp = command("usage", cmd_usage, "requests and tokens per consumer, provider, model, day")
    sp.add_argument("--since", help="a day (2026-01-31) or a duration ago (7d)")
    sp.add_argument("--by", help="group by some of: consumer,provider,model,route,day")
    sp.add_argument("--json", action="store_true", help=JSON)

    sp = command("serve", cmd_serve, "run the broker in the foreground")
    sp.add_argument("--listen", help="HOST:PORT for loopback HTTP (default from config.toml)")
    sp.add_argument("--log-format", choices=("json", "console"),
                    help="default: console on a terminal, else json")
    sp.add_argument("--allow-remote", action="store_true",
                    help="permit a non-loopback --listen address (not recommended)")
    workers_help = "processes serving requests (default from config.toml: 1)"
    sp.add_argument("--workers", type=_workers, metavar="N|auto", help=workers_help)

    sp = command("start", cmd_start, "start the broker in the background and wait for it")
    sp.add_argument("--listen", help="HOST:PORT for loopback HTTP (default from config.toml)")
    sp.add_argument("--workers", type=_workers, metavar="N|auto", help=workers_help)
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")

    sp = command("stop", cmd_stop, "stop the background broker")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")

    sp = command("status", cmd_status, "show whether the broker runs, and its state")
    sp.add_argument("--json", action="store_true", help=JSON)

    sp = command("ui", cmd_ui, "open the dashboard in a browser with a one-time login link")
    sp.add_argument("--print", action="store_true",
                    help="print the link instead of opening a browser")

    command("mcp", cmd_mcp, "serve the MCP tools over stdio for an agent (its consumer token "
            "in SECRET_BROKER_TOKEN or SECRET_BROKER_TOKEN_FILE)")

    token = sub.add_parser("token", help="bootstrap and consumer tokens").add_subparsers(
        dest="token_command", required=True, metavar="SUBCOMMAND")
    command("rotate", cmd_token_rotate, "make a new bootstrap token; the old one stops working",
            token)
    sp = command("create", cmd_token_create, "make a token for one consumer (shown once)", token)
    sp.add_argument("--consumer", required=True, help="the consumer the token proves")
    sp.add_argument("--ttl", help="lifetime: 90s, 30m, 12h, 7d (default: until revoked)")
    sp.add_argument("--description", help="a note for `token list`")
    sp.add_argument("--daily-tokens", type=int, metavar="N",
                    help="daily budget of input + output tokens (429 past it)")
    sp.add_argument("--json", action="store_true", help=JSON)
    sp = command("list", cmd_token_list, "list consumer tokens (never their values)", token)
    sp.add_argument("--json", action="store_true", help=JSON)
    sp = command("revoke", cmd_token_revoke, "revoke a token, or every token of a consumer",
                 token)
    sp.add_argument("id", nargs="?", help="the token's id (tok_...)")
    sp.add_argument("--consumer", help="revoke every token of this consumer")

    sp = command("export", cmd_export,
                 "write every secret to one age-encrypted file (-o FILE or a pipe)")
    recipient = sp.add_mutually_exclusive_group(required=True)
    recipient.add_argument("--to", action="append", metavar="AGE_RECIPIENT",
                           help="encrypt to this age1... recipient (repeatable)")
    recipient.add_argument("--passphrase", action="store_true",
                           help="encrypt with a passphrase: SECRET_BROKER_EXPORT_PASSPHRASE_FILE, "
                                "SECRET_BROKER_EXPORT_PASSPHRASE or a prompt")
    sp.add_argument("--with-grants", action="store_true",
                    help="carry secrets.grants.toml and profiles.toml too")
    _add_output_options(sp)

    sp = command("import", cmd_import, "store the secrets of an export in this home's store")
    sp.add_argument("file", metavar="FILE", help="the export file, or - for stdin")
    sp.add_argument("--identity", metavar="FILE",
                    help="age identity file (AGE-SECRET-KEY-1...) for a recipient export")
    sp.add_argument("--replace", action="store_true",
                    help="overwrite refs (and, with --with-grants, files) that exist")
    sp.add_argument("--with-grants", action="store_true",
                    help="restore the grants and profiles files the export carries")

    sp = command("check", cmd_check,
                 "check the home: modes, files, grants, store, audit, tokens, daemon "
                 "(exit 1 on an error)")
    sp.add_argument("--json", action="store_true", help=JSON)
    sp.add_argument("--fix", action="store_true", help="repair file modes (nothing else)")

    from broker.cli.team import add_commands as add_team_commands

    add_team_commands(sub, command)

    from broker.cli.completions import SHELLS

    sp = command("completions", cmd_completions, "print a shell completion script")
    sp.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    return p


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("use a number of at least 1, or auto")
    return int(text)


class _Printable:
    """stdout or stderr, escaping every control character written: a message or table that
    quotes a route, a ref or a file name cannot drive the terminal (erase or fake lines)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.unescaped = stream  # for writers that escape for themselves (the log renderers)

    def write(self, text: str) -> int:
        return self._stream.write(printable(text, lines=True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; map the error hierarchy to exit codes (the only place that does)."""
    sys.stdout, sys.stderr = (cast(TextIO, _Printable(s)) for s in (sys.stdout, sys.stderr))
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except BrokerError as exc:
        print(f"secret-broker: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("secret-broker: interrupted; nothing more was changed", file=sys.stderr)
        return 130
    except Exception as exc:
        from grants.model import GrantsError  # here, so `exec` never pays for importing grants

        if isinstance(exc, GrantsError):
            print(f"secret-broker: error: {exc}", file=sys.stderr)
            return 1
        if os.environ.get("SECRET_BROKER_DEBUG"):
            raise
        # The message may quote input; name only the type, and how to see more.
        print(f"secret-broker: unexpected internal error ({type(exc).__name__}); "
              "run with SECRET_BROKER_DEBUG=1 for details", file=sys.stderr)
        return 1
