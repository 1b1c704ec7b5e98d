"""`secret-broker team …`: thin commands over `service/team.py`. No command prints a value:
values reach programs through `exec`, `inject`, leases and the gateway."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.cli.common import JSON, context, print_json, print_table, read_value
from broker.core.errors import UsageError
from broker.core.refs import parse_ref

if TYPE_CHECKING:
    from broker.service.team import Checkout, Teams
    from broker.service.team_changes import TeamChanges

Command = Callable[..., argparse.ArgumentParser]


def _teams(args: argparse.Namespace) -> Teams:
    from broker.service.team import Teams

    return Teams(context(args))


def _where(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else Path.cwd()


def _checkout(args: argparse.Namespace) -> tuple[Teams, Checkout]:
    teams = _teams(args)
    return teams, teams.load(teams.pick(args.team, _where(args)), ref="HEAD")


def _changes(args: argparse.Namespace) -> TeamChanges:
    from broker.service.team_changes import TeamChanges

    return TeamChanges(*_checkout(args))


def cmd_init(args: argparse.Namespace) -> int:
    from broker.service.team import fingerprint_text

    team, fingerprint = _teams(args).init(_where(args), args.name, args.as_)
    print(f"team {args.name} created (team id {team.team_id}); you are its admin")
    print(f"fingerprint: {fingerprint_text(fingerprint)}")
    print("give the fingerprint to teammates over a channel you trust; each runs, in a clone:\n"
          f"  secret-broker team join --fingerprint '{fingerprint_text(fingerprint)}'")
    print("then: `secret-broker team group add NAME` and `team member add` with their card")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    team, card = _teams(args).join(_where(args), args.fingerprint, args.as_, args.host)
    print(f"joined team {team.roster.team_name}; send this card to an admin, who runs "
          "`secret-broker team member add NAME --card CARD --role ROLE --group GROUP`:")
    print(card)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from broker.service.team import check_name, default_member_name

    teams = _teams(args)
    identity = teams.identity()
    if identity is None:
        raise UsageError("this home has no team identity yet: `team join` or `team init`")
    name = args.as_
    if name is None and teams.configured():
        checkout = teams.load(teams.pick(args.team, _where(args)), ref="HEAD")
        name = checkout.me.name if checkout.me else None
    print(identity.card(check_name("member name", name or default_member_name(False))).text())
    return 0


def _status_doc(checkout: Checkout) -> dict[str, Any]:
    from broker.service.team import fingerprint_text
    from broker.service.team_guard import installed

    team = checkout.team
    age_hours = (time.time() - checkout.repo.commit_time(checkout.commit)) / 3600
    return {
        "team": checkout.config.name, "team_id": team.team_id,
        "fingerprint": fingerprint_text(team.fingerprint), "path": str(checkout.repo.root),
        "commit": checkout.commit, "roster_generation": team.roster.generation,
        "member": checkout.me.name if checkout.me else None,
        "role": checkout.me.role if checkout.me else None,
        "groups": list(checkout.me.groups) if checkout.me else [],
        "team_groups": list(team.roster.groups),
        "secrets": len(team.secrets), "to_rotate": team.to_rotate(),
        "checkout_age_hours": round(age_hours, 1), "hook_installed": installed(checkout.repo),
    }


def cmd_identity_export(args: argparse.Namespace) -> int:
    _teams(args).export_identity(Path(args.output))
    print(f"wrote this member's age identity to {args.output} (mode 0600): with it, "
          "`age -d -i FILE SECRET.age` opens a team secret without the broker; delete it "
          "after use")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc = _status_doc(_checkout(args)[1])
    if args.json:
        print_json(doc)
        return 0
    for key, value in doc.items():
        if key == "to_rotate":
            value = ", ".join(f"@{r} (exposed to {', '.join(w)})" for r, w in value.items()) \
                or "none"
        print(f"{key.replace('_', ' ')}: {value}")
    return 0


def cmd_member_add(args: argparse.Namespace) -> int:
    commit = _changes(args).add_member(args.name, args.card, args.role, args.group)
    print(f"added {args.name} as {args.role} (commit "
          f"{commit[:12]}); push it with `secret-broker team sync`")
    return 0


def cmd_member_remove(args: argparse.Namespace) -> int:
    commit, refs = _changes(args).remove_member(args.name)
    print(f"removed {args.name} (commit {commit[:12]}); every secret they could read is "
          "re-encrypted without them")
    _print_rotate(args.name, refs)
    return 0


def _print_rotate(name: str, refs: list[str]) -> None:
    if refs:
        print(f"{name} could read these before, and may have copies: rotate each at its "
              "provider, then `secret-broker team set` the new value:")
        for item in refs:
            print(f"  @{item.partition('/')[2]}  (group {item.partition('/')[0]})")


def cmd_member_list(args: argparse.Namespace) -> int:
    checkout = _checkout(args)[1]
    members = sorted(checkout.team.roster.members.values(), key=lambda m: m.name)
    if args.json:
        print_json([{"name": m.name, "role": m.role, "groups": list(m.groups), "age": m.age}
                    for m in members])
        return 0
    print_table([[m.name, m.role, ",".join(m.groups) or "-", m.age] for m in members],
                ["NAME", "ROLE", "GROUPS", "AGE RECIPIENT"])
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    commit = _changes(args).group(args.group, args.group_command == "add")
    print(f"group {args.group} {'added' if args.group_command == 'add' else 'removed'} "
          f"(commit {commit[:12]})")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    grant = args.team_command == "grant"
    commit, refs = _changes(args).set_groups(args.name, args.group, grant)
    print(f"{args.name} {'can now read' if grant else 'can no longer read'} group {args.group} "
          f"(commit {commit[:12]})")
    _print_rotate(args.name, refs)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    value = read_value(args, f"value for team secret @{ref}: ")
    commit = _changes(args).set_secret(ref, args.group, args.provider, args.kind, value)
    print(f"stored @{ref} in group {args.group} (commit {commit[:12]}); push it with "
          "`secret-broker team sync`")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    commit = _changes(args).remove_secret(ref)
    print(f"removed @{ref} with a signed tombstone (commit {commit[:12]})")
    return 0


def _secret_doc(checkout: Checkout, ref: str) -> dict[str, Any]:
    env = checkout.team.secrets[ref].envelope
    return {"ref": ref, "served_as": f"@{checkout.config.ref_prefix}{ref}", "group": env.group,
            "provider": env.provider, "kind": env.kind, "version": env.version, "seq": env.seq,
            "signer": env.signed_by, "written_at": env.written_at,
            "recipients": sorted(env.recipients),
            "readable_here": checkout.me is not None and checkout.me.name in env.recipients}


def cmd_list(args: argparse.Namespace) -> int:
    checkout = _checkout(args)[1]
    docs = [_secret_doc(checkout, ref) for ref in sorted(checkout.team.secrets)]
    if args.json:
        print_json(docs)
        return 0
    print_table([[d["served_as"], d["group"], d["provider"], d["kind"], d["version"],
                  d["signer"], "yes" if d["readable_here"] else "no"] for d in docs],
                ["REF", "GROUP", "PROVIDER", "KIND", "VERSION", "SIGNER", "READABLE HERE"])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from broker.core.errors import SecretNotFound

    checkout = _checkout(args)[1]
    ref = parse_ref(args.ref)
    if ref not in checkout.team.secrets:
        raise SecretNotFound(f"team {checkout.config.name} has no secret @{ref}")
    print_json(_secret_doc(checkout, ref))
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    commit = _changes(args).rekey(args.group)
    print("nothing to re-encrypt: every secret is encrypted to its group's readers"
          if commit is None else f"re-encrypted to the current roster (commit {commit[:12]})")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from broker.service.team_sync import TeamSync

    teams = _teams(args)
    old, new = TeamSync(teams).pull(teams.pick(args.team, _where(args)))
    print("already up to date" if old == new else f"verified and fast-forwarded to {new[:12]}"
          + _tell_broker(teams))
    return 0


def _tell_broker(teams: Teams) -> str:
    """Have a running broker read the new commit now, not at its next look (within 2 s)."""
    from broker.client import BrokerClient
    from broker.core.errors import BrokerError

    try:
        BrokerClient(socket_path=teams.ctx.home.socket).request("POST", "/v1/admin/teams/reload")
    except BrokerError:
        return ""
    return "; the running broker serves it now"


def cmd_sync(args: argparse.Namespace) -> int:
    from broker.service.team_sync import TeamSync

    teams = _teams(args)
    head = TeamSync(teams).sync(teams.pick(args.team, _where(args)))
    print(f"in sync with the remote at {head[:12]}")
    return 0


def cmd_trust_reset(args: argparse.Namespace) -> int:
    from broker.service.team_sync import TeamSync

    teams = _teams(args)
    team = TeamSync(teams).trust_reset(teams.pick(args.team, _where(args)), args.to)
    print(f"this home now trusts team {team.roster.team_name} as of {args.to} (roster "
          f"generation {team.roster.generation}); the reset is audited")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from broker.service.team_check import check_team

    report = check_team(args.dir, args.team, ci=args.ci,
                        scan_scope="staged" if args.staged else "all")
    if args.json:
        print_json(report)
    else:
        for item in report["errors"]:
            print(f"error: {item}")
        for item in report["warnings"]:
            print(f"warning: {item}")
        print(f"{len(report['errors'])} error(s), {len(report['warnings'])} warning(s)")
    return 1 if report["errors"] else 0


def cmd_hook(args: argparse.Namespace) -> int:
    from broker.service.team import find_repo
    from broker.service.team_guard import install, scan, stored_values_of_this_home, uninstall

    repo = find_repo(_where(args))
    if args.hook_command == "run":
        found = scan(repo, stored_values_of_this_home(), staged_only=True)
        if not found:
            return 0
        from broker.team.guard import RULES

        for finding in found:
            print(f"secret-broker guard: {finding.path}: {RULES[finding.rule]}", file=sys.stderr)
        print("the commit was refused; nothing was committed", file=sys.stderr)
        return 1
    path, changed = (install if args.hook_command == "install" else uninstall)(repo)
    verb = "installed in" if args.hook_command == "install" else "removed from"
    print(f"guard {verb} {path}" if changed else f"nothing to do in {path}")
    return 0


def add_commands(sub: Any, command: Command) -> None:
    """`team …` under the main parser; `command` is main's way of adding one command."""
    team = sub.add_parser("team", help="share keys with a team through a git repository")
    tsub = team.add_subparsers(dest="team_command", required=True, metavar="SUBCOMMAND")

    def cmd(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            parent: Any = tsub) -> argparse.ArgumentParser:
        sp = command(name, fn, help_, parent)
        sp.add_argument("--dir", metavar="PATH", help="the repository (default: here)")
        sp.add_argument("--team", metavar="NAME", help="which configured team")
        return sp

    sp = cmd("init", cmd_init, "start a team vault in this git repository, with you as admin")
    sp.add_argument("--name", required=True, help="the team's name (also its ref prefix)")
    sp.add_argument("--as", dest="as_", metavar="NAME", help="your member name")
    sp = cmd("join", cmd_join, "pin a team by its fingerprint and print your card")
    sp.add_argument("--fingerprint", required=True, help="as `team init` printed it")
    sp.add_argument("--as", dest="as_", metavar="NAME", help="your member name")
    sp.add_argument("--host", action="store_true",
                    help="a machine or agent: a reader identity named after the host")
    sp = cmd("card", cmd_card, "print this member's card (public keys, self-signed)")
    sp.add_argument("--as", dest="as_", metavar="NAME", help="the name the card carries")
    identity = tsub.add_parser("identity", help="this member's private keys").add_subparsers(
        dest="identity_command", required=True, metavar="SUBCOMMAND")
    sp = cmd("export", cmd_identity_export,
             "write the age identity to a new 0600 file, for the `age` tool in an emergency",
             identity)
    sp.add_argument("-o", "--output", required=True, metavar="FILE", help="a new file")
    sp = cmd("status", cmd_status, "team, commit, roster, your role, refs to rotate")
    sp.add_argument("--json", action="store_true", help=JSON)

    member = tsub.add_parser("member", help="add, remove and list members").add_subparsers(
        dest="member_command", required=True, metavar="SUBCOMMAND")
    sp = cmd("add", cmd_member_add, "add a member from their card", member)
    sp.add_argument("name", help="the member's name (as on the card)")
    sp.add_argument("--card", required=True, help="sbteam-card:1:…")
    sp.add_argument("--role", required=True, choices=("admin", "writer", "reader"),
                    help="admin: everything; writer: its groups; reader: reads its groups")
    sp.add_argument("--group", action="append", default=[], help="a group they read")
    sp = cmd("remove", cmd_member_remove, "remove a member; prints the refs to rotate", member)
    sp.add_argument("name", help="the member to remove")
    sp = cmd("list", cmd_member_list, "the roster", member)
    sp.add_argument("--json", action="store_true", help=JSON)

    group = tsub.add_parser("group", help="add or remove a group").add_subparsers(
        dest="group_command", required=True, metavar="SUBCOMMAND")
    for verb in ("add", "remove"):
        sp = cmd(verb, cmd_group, f"{verb} a group", group)
        sp.add_argument("group", help="1-64 of a-z 0-9 _ . -")
    for verb, what in (("grant", "let a member read a group"),
                       ("revoke", "stop a member reading a group; prints the refs to rotate")):
        sp = cmd(verb, cmd_grant, what)
        sp.add_argument("name", help="the member")
        sp.add_argument("group", help="the group")

    sp = cmd("set", cmd_set, "store a team secret or a new value (from --stdin or a prompt)")
    sp.add_argument("ref", help="@ref inside the team")
    sp.add_argument("--group", required=True, help="the group whose readers get it")
    sp.add_argument("--provider", required=True, help="openai, google, anthropic, ...")
    sp.add_argument("--kind", default="api_key", help="api_key (default), token, ...")
    sp.add_argument("--stdin", action="store_true", help="read the value from standard input")
    sp = cmd("rm", cmd_rm, "remove a team secret (a signed tombstone)")
    sp.add_argument("ref", help="@ref inside the team")
    sp = cmd("list", cmd_list, "team secrets (metadata only)")
    sp.add_argument("--json", action="store_true", help=JSON)
    sp = cmd("inspect", cmd_inspect, "one team secret's metadata, as JSON")
    sp.add_argument("ref", help="@ref inside the team")
    sp = cmd("rekey", cmd_rekey, "re-encrypt to the current roster (finishes a removal)")
    sp.add_argument("--group", help="only this group (a writer of it may run this)")
    cmd("pull", cmd_pull, "fetch, verify and fast-forward (refuses an invalid commit)")
    cmd("sync", cmd_sync, "pull, rebase your team commits, verify, push")
    sp = cmd("check", cmd_check, "verify the team and scan for keys (exit 1 on an error)")
    sp.add_argument("--json", action="store_true", help=JSON)
    scope = sp.add_mutually_exclusive_group()
    scope.add_argument("--staged", action="store_true", help="scan staged files")
    scope.add_argument("--all", action="store_true", help="scan all tracked files (default)")
    sp.add_argument("--ci", action="store_true",
                    help="for CI: no home needed; checks the format and signatures, not the pin")
    hook = tsub.add_parser("hook", help="the pre-commit guard").add_subparsers(
        dest="hook_command", required=True, metavar="SUBCOMMAND")
    for verb, what in (("install", "put the guard at the top of the pre-commit hook"),
                       ("uninstall", "take the guard out of the pre-commit hook"),
                       ("run", "scan what is staged (the hook runs this)")):
        cmd(verb, cmd_hook, what, hook)
    sp = cmd("trust-reset", cmd_trust_reset, "accept a rewritten history (audited)")
    sp.add_argument("--to", required=True, metavar="COMMIT",
                    help="the commit to trust from now on (HEAD, a hash, a branch)")
