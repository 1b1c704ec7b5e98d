"""Team vaults for one home: its identity, the teams it follows, and every change to them.

A change is computed as file contents (`team.edit`), verified in memory with the same
function every reader uses (`team.verify`), and only then written and committed; a commit
that fails leaves the checkout as it was. Reading trusts committed objects only, checked
against what this home pinned and remembers (rollback protection in `metadata.db`).
"""

from __future__ import annotations

import getpass
import re
import secrets as random
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from broker.config import TeamConfig
from broker.core.clock import rfc3339
from broker.core.errors import (
    BrokerError,
    GitFailed,
    NotFound,
    SecretNotFound,
    TeamInvalid,
    UsageError,
)
from broker.core.home import write_private
from broker.core.refs import TEAM_NAME_RE
from broker.service.context import Context
from broker.service.team_guard import install as install_hook
from broker.store.metadata import Metadata, SecretMeta
from broker.team import edit
from broker.team.format import DIR, ROLES, FormatError, Member, parse_card, roster_path, sha256
from broker.team.gitrepo import GitError, Repo
from broker.team.keys import BadKey, Identity, card_is_genuine
from broker.team.verify import Broken, Marks, Verified, verify_team

IDENTITY = "!team-identity"  # the store's internal entry holding this home's private keys


def fingerprint_text(fp: str) -> str:
    """The genesis fingerprint as people read it aloud: hex in groups of four."""
    return " ".join(fp[i:i + 4] for i in range(0, len(fp), 4))


def parse_fingerprint(text: str) -> str:
    fp = re.sub(r"[\s:-]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise UsageError("a team fingerprint is 64 hex digits (spaces allowed), as "
                         "`secret-broker team init` printed it")
    return fp


def check_name(what: str, name: str) -> str:
    if not TEAM_NAME_RE.fullmatch(name):
        raise UsageError(f"{what} {name!r}: use 1-64 of a-z 0-9 _ . - , starting with a "
                         "letter or digit")
    return name


def default_member_name(host: bool) -> str:
    raw = socket.gethostname() if host else getpass.getuser()
    name = re.sub(r"[^a-z0-9_.-]", "-", raw.lower()).lstrip("_.-")[:64]
    return name or "member"


@dataclass(frozen=True)
class Checkout:
    """One verified commit of a team, and who this home is in it."""
    config: TeamConfig
    repo: Repo
    commit: str
    team: Verified
    me: Member | None

    def my_name(self) -> str:
        if self.me is None:
            raise UsageError(f"this home is not a member of team {self.config.name} yet: send "
                             "your card (`secret-broker team card`) to an admin")
        return self.me.name


class Teams:
    """The team vaults a home follows, as the context's actor."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # --- identity ---------------------------------------------------------------------------

    def identity(self) -> Identity | None:
        try:
            return Identity.from_entry(self.ctx.store.get(IDENTITY))
        except SecretNotFound:
            return None
        except BadKey as exc:
            raise TeamInvalid(str(exc)) from None

    def ensure_identity(self) -> Identity:
        found = self.identity()
        if found is not None:
            return found
        identity = Identity.generate()
        self.ctx.store.put(IDENTITY, identity.entry(), 1)
        self.ctx.record("team.identity_created", recipient=identity.recipient)
        return identity

    def _my_identity(self) -> Identity:
        identity = self.identity()
        if identity is None:
            raise NotFound("this home has no team identity: run `secret-broker team join` "
                           "or `secret-broker team init`")
        return identity

    def export_identity(self, path: Path) -> None:
        """The age half of this home's identity, in a new 0600 file, for `age -d -i` when
        the broker cannot run. Never over an existing file, never to a terminal."""
        identity = self._my_identity()
        if path.exists():
            raise UsageError(f"{path} exists; name a new file")
        write_private(path, (f"# secret-broker team identity ({identity.recipient}); keep it "
                             "offline and delete it after use\n"
                             f"{identity.age_secret}\n").encode(), replace=False)
        self.ctx.record("team.identity_exported", recipient=identity.recipient, file=str(path))

    # --- which team -----------------------------------------------------------------------

    def configured(self) -> dict[str, TeamConfig]:
        return dict(self.ctx.session.config.teams)

    def pick(self, name: str | None = None, where: Path | None = None) -> TeamConfig:
        """`--team NAME`, else the team whose work tree holds `where` (the current
        directory), else the only one configured."""
        teams = self.configured()
        if name is not None:
            if name not in teams:
                raise NotFound(f"no team {name!r} in config.toml; known: "
                               f"{', '.join(sorted(teams)) or 'none'}")
            return teams[name]
        here = (where or Path.cwd()).resolve()
        for team in teams.values():
            root = Path(team.path).resolve()
            if here == root or root in here.parents:
                return team
        if len(teams) == 1:
            return next(iter(teams.values()))
        if not teams:
            raise NotFound("this home follows no team: `secret-broker team init` or "
                           "`team join` one")
        raise UsageError(f"several teams are configured ({', '.join(sorted(teams))}): name "
                         "one with --team, or run inside its repository")

    def _register(self, name: str, root: Path) -> None:
        """Add `[teams.NAME]` to config.toml, keeping the rest of the file as written."""
        text = self.ctx.home.config.read_text()
        table = tomli_w.dumps({"teams": {name: {"path": str(root)}}})
        write_private(self.ctx.home.config, (text.rstrip("\n") + "\n\n" + table).encode())

    # --- reading --------------------------------------------------------------------------

    def load(self, config: TeamConfig, *, ref: str | None = None, remember: bool = True,
             since: str | None = None) -> Checkout:
        """The verified commit the team's ref names; TeamInvalid (audited) if it fails.

        The commit must descend from the last one verified here, or from `since` (the base
        that `sync` rebases this member's own unpushed commits from)."""
        repo, commit, result = read_commit(self.ctx.metadata, config, ref=ref, since=since)
        if isinstance(result, Broken):
            self.ctx.record(failure_event(result), team=config.name, commit=commit,
                            file=result.file, rule=result.rule)
            raise TeamInvalid(f"team {config.name} at commit {commit[:12]}: {result.message}")
        if remember:
            remember_commit(self.ctx.metadata, config.name, commit, result)
        return Checkout(config, repo, commit, result, self._me(result.roster.members))

    def _me(self, members: Mapping[str, Member]) -> Member | None:
        identity = self.identity()
        if identity is None:
            return None
        key = identity.verify_key
        return next((m for m in members.values() if m.sign == key), None)

    def value(self, checkout: Checkout, ref: str) -> str:
        secret = checkout.team.secrets.get(ref)
        if secret is None:
            raise SecretNotFound(f"team {checkout.config.name} has no secret @{ref}")
        try:
            return edit.value_of(checkout.team, ref, self._my_identity())
        except BadKey:
            raise TeamInvalid(f"@{checkout.config.ref_prefix}{ref} cannot be decrypted with "
                              "this home's identity: this member is not one of its "
                              f"recipients (group {secret.envelope.group})") from None
        except FormatError as exc:
            raise TeamInvalid(f"team {checkout.config.name}: {exc}") from None

    def split_refs(self, refs: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
        """Local refs, and team name -> refs inside the team, for refs served by a team."""
        teams = self.configured()
        local: list[str] = []
        served: dict[str, list[str]] = {}
        for ref in refs:
            team = next((t for t in teams.values() if ref.startswith(t.ref_prefix)), None)
            if team is None:
                local.append(ref)
            else:
                served.setdefault(team.name, []).append(ref[len(team.ref_prefix):])
        return local, served

    def values(self, refs: Iterable[str]) -> dict[str, str]:
        """Served ref (with its prefix) -> value, for refs that name team secrets."""
        _local, served = self.split_refs(refs)
        out: dict[str, str] = {}
        for name, inside in served.items():
            config = self.configured()[name]
            checkout = self.load(config)
            for ref in inside:
                if self.ctx.metadata.find(config.ref_prefix + ref) is not None:
                    raise TeamInvalid(f"@{config.ref_prefix}{ref} is both a local secret and "
                                      f"a secret of team {name}; rename the local one")
                out[config.ref_prefix + ref] = self.value(checkout, ref)
        return out

    def metas(self) -> tuple[list[SecretMeta], list[str]]:
        """Every configured team's secrets as `list` shows them (backend `team:NAME`), and a
        sentence for each team that cannot be read now."""
        metas, problems = [], []
        for config in self.configured().values():
            try:
                checkout = self.load(config)
            except BrokerError as exc:
                problems.append(f"team {config.name}: {exc.message}")
                continue
            for ref, secret in sorted(checkout.team.secrets.items()):
                env = secret.envelope
                metas.append(SecretMeta(config.ref_prefix + ref, env.provider, env.kind,
                                        f"team:{config.name}", f"commit {checkout.commit[:12]}",
                                        env.version, env.written_at, None, None))
        return metas, problems

    def describe(self, served: str) -> dict[str, Any]:
        """`inspect` of a served team ref: metadata only, never the value."""
        _local, inside = self.split_refs([served])
        if not inside:
            raise SecretNotFound(f"no team serves @{served}")
        name, refs = next(iter(inside.items()))
        ref = refs[0]
        checkout = self.load(self.configured()[name])
        secret = checkout.team.secrets.get(ref)
        if secret is None:
            raise SecretNotFound(f"team {name} has no secret @{ref}")
        env = secret.envelope
        return {"ref": served, "backend": f"team:{name}", "group": env.group,
                "provider": env.provider, "kind": env.kind, "version": env.version,
                "seq": env.seq, "signer": env.signed_by, "written_at": env.written_at,
                "commit": checkout.commit, "recipients": sorted(env.recipients)}

    # --- following the remote ---------------------------------------------------------

    def pull(self, config: TeamConfig) -> tuple[str, str]:
        """Fetch, verify what came in, fast-forward; (old, new) commit. A non-fast-forward
        (GitFailed, exit 1) or an invalid commit (TeamInvalid, exit 5) changes nothing."""
        checkout = self.load(config, ref="HEAD")
        repo = checkout.repo
        if repo.busy():
            raise GitFailed(f"{repo.root} is in the middle of {repo.busy()}: finish it first")
        try:
            upstream = repo.upstream()
            repo.git("fetch", "--quiet", upstream.split("/", 1)[0])
        except GitError as exc:
            raise GitFailed(f"cannot fetch team {config.name}: {exc}") from None
        new = _commit(repo, upstream)
        if not repo.is_ancestor(checkout.commit, new):
            if repo.is_ancestor(new, checkout.commit):
                return checkout.commit, checkout.commit  # nothing new; ours is ahead
            raise GitFailed(f"{upstream} is not a fast-forward of this checkout (both have "
                            "new commits): run `secret-broker team sync` to rebase yours")
        self.load(config, ref=new)  # verifies (and remembers) before the checkout moves
        try:
            repo.git("merge", "--quiet", "--ff-only", new)
        except GitError as exc:
            raise GitFailed(f"cannot fast-forward {repo.root}: {exc}") from None
        if new != checkout.commit:
            self.ctx.record("team.pulled", team=config.name, commit=new)
        return checkout.commit, new

    def sync(self, config: TeamConfig) -> str:
        """Pull (rebasing this member's unpushed team commits), verify, push."""
        checkout = self.load(config, ref="HEAD")
        repo, old = checkout.repo, checkout.commit
        try:
            upstream = repo.upstream()
            remote, _, branch = upstream.partition("/")
            fetched_before = repo.commit_of(upstream)
            repo.git("fetch", "--quiet", remote)
            new = _commit(repo, upstream)
            if fetched_before is not None and not _descends(repo, fetched_before, new):
                raise TeamInvalid(f"{upstream} was rewritten (it no longer holds commit "
                                  f"{fetched_before[:12]}); if that was deliberate, run "
                                  "`secret-broker team trust-reset --to COMMIT`")
            if repo.is_ancestor(old, new):  # nothing of ours to rebase
                self.load(config, ref=new)
                repo.git("merge", "--quiet", "--ff-only", new)
            elif not repo.is_ancestor(new, old):
                self._rebase(repo, new)
                try:  # theirs and ours together, as the next reader will verify them
                    self.load(config, ref="HEAD", since=new)
                except TeamInvalid:
                    repo.git("reset", "--quiet", "--hard", old)
                    raise
            head = _commit(repo, "HEAD")
        except GitError as exc:
            raise GitFailed(f"cannot sync team {config.name}: {exc}") from None
        try:
            repo.git("push", "--quiet", remote, f"HEAD:{branch}")
        except GitError as exc:
            raise GitFailed(f"the remote refused the push ({exc}); your team commits are "
                            "still here, verified: fix what it says and run `secret-broker "
                            "team sync` again") from None
        self.ctx.record("team.synced", team=config.name, commit=head)
        return head

    def _rebase(self, repo: Repo, onto: str) -> None:
        proc = repo.git("rebase", "--quiet", onto, check=False)
        if repo.busy() == "a rebase":
            conflicted = repo.git("diff", "--name-only", "--diff-filter=U").split()
            repo.git("rebase", "--abort", check=False)
            raise GitFailed(f"your team commits conflict with the remote's on "
                            f"{', '.join(conflicted) or 'the same files'}: the same ref or "
                            "roster generation was changed on both sides; nothing was changed "
                            "here (redo your change after `team pull`)")
        if repo.commit_of("HEAD") is None:
            raise GitFailed(f"rebase failed: {proc.strip()[-200:]}")

    def trust_reset(self, config: TeamConfig, commit: str) -> Verified:
        """Accept `commit` after a deliberate history rewrite: this home's rollback memory
        becomes what that commit holds."""
        repo = find_repo(Path(config.path))
        target = _commit(repo, commit)
        trust = self.ctx.metadata.team_trust(config.name)
        if trust is None:
            raise NotFound(f"team {config.name} is not pinned in this home")
        result = verify_team(trust.fingerprint, Marks(), repo.files(target))
        if isinstance(result, Broken):
            raise TeamInvalid(f"commit {target[:12]} does not verify: {result.message}")
        marks = result.marks
        self.ctx.metadata.remember_team(config.name, target, marks.generation, dict(marks.seqs),
                                        reset=True)
        self.ctx.record("team.trust_reset", team=config.name, commit=target,
                        previous=trust.commit)
        return result

    # --- changing -------------------------------------------------------------------------

    def actor(self, checkout: Checkout) -> edit.Actor:
        return edit.Actor(checkout.my_name(), self._my_identity(), rfc3339())

    def commit(self, checkout: Checkout, change: edit.Files, message: str, event: str,
               **fields: Any) -> str:
        """Verify the change in memory, write and commit it, remember it, audit it."""
        repo = checkout.repo
        if repo.busy():
            raise GitFailed(f"{repo.root} is in the middle of {repo.busy()}: finish or abort "
                            "it first")
        dirty = repo.dirty()
        if dirty:
            raise GitFailed(f"{DIR}/ has uncommitted changes ({', '.join(dirty[:3])}): commit "
                            "or discard them first (`git status`)")
        head = _commit(repo, "HEAD")
        if head != checkout.commit:
            raise GitFailed(f"HEAD ({head[:12]}) is not the commit verified for this change "
                            f"({checkout.commit[:12]}); check out the team's branch")
        files = {**repo.files(head)}
        for path, data in change.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = data
        trust = self.ctx.metadata.team_trust(checkout.config.name)
        assert trust is not None
        result = verify_team(trust.fingerprint, Marks(trust.generation, trust.seqs), files)
        if isinstance(result, Broken):  # a bug of ours, or a team already broken
            raise TeamInvalid(f"the change would break team {checkout.config.name}: "
                              f"{result.message}")
        try:
            commit = repo.write_and_commit(change, message, checkout.my_name())
        except (GitError, OSError) as exc:
            raise GitFailed(f"cannot commit to {repo.root}: {exc}") from None
        marks = result.marks
        self.ctx.metadata.remember_team(checkout.config.name, commit, marks.generation,
                                        dict(marks.seqs))
        self.ctx.record(event, team=checkout.config.name, commit=commit, **fields)
        return commit

    def init(self, where: Path, name: str, member: str | None) -> tuple[Verified, str]:
        """A new team in the repository holding `where`, with this home as its first admin."""
        check_name("team name", name)
        repo = find_repo(where)
        if (repo.root / DIR).exists():
            raise UsageError(f"{repo.root / DIR} exists already: `team join` it instead")
        if repo.busy():
            raise GitFailed(f"{repo.root} is in the middle of {repo.busy()}: finish it first")
        identity = self.ensure_identity()
        me = check_name("member name", member or default_member_name(False))
        change = edit.new_team(random.token_hex(16), name, edit.Actor(me, identity, rfc3339()))
        genesis = change[roster_path(1)]
        assert genesis is not None
        fingerprint = sha256(genesis)
        if name in self.configured():
            raise UsageError(f"a team named {name!r} is already configured in "
                             f"{self.ctx.home.config}")
        try:
            commit = repo.write_and_commit(change, f"team {name}: created by {me}", me)
        except (GitError, OSError) as exc:
            raise GitFailed(f"cannot commit to {repo.root}: {exc}") from None
        self._register(name, repo.root)
        result = verify_team(fingerprint, Marks(), repo.files(commit))
        assert isinstance(result, Verified), result
        self.ctx.metadata.pin_team(name, result.team_id, fingerprint)
        self.ctx.metadata.remember_team(name, commit, 1, {})
        self.ctx.record("team.initialized", team=name, team_id=result.team_id, commit=commit,
                        fingerprint=fingerprint)
        install_hook(repo)
        return result, fingerprint

    def join(self, where: Path, fingerprint: str, member: str | None, host: bool
             ) -> tuple[Verified, str]:
        """Pin a team whose first roster has this fingerprint; make this home's identity."""
        fp = parse_fingerprint(fingerprint)
        repo = find_repo(where)
        commit = _commit(repo, "HEAD")
        result = verify_team(fp, Marks(), repo.files(commit))
        if isinstance(result, Broken):
            raise TeamInvalid(f"cannot join: {result.message}")
        name = result.roster.team_name
        if name in self.configured():
            raise UsageError(f"a team named {name!r} is already configured in "
                             f"{self.ctx.home.config}")
        identity = self.ensure_identity()
        self._register(name, repo.root)
        self.ctx.metadata.pin_team(name, result.team_id, fp)
        marks = result.marks
        self.ctx.metadata.remember_team(name, commit, marks.generation, dict(marks.seqs))
        me = check_name("member name", member or default_member_name(host))
        self.ctx.record("team.joined", team=name, team_id=result.team_id, commit=commit,
                        member=me, host=host)
        install_hook(repo)
        return result, identity.card(me).text()

    def add_member(self, checkout: Checkout, name: str, card_text: str, role: str,
                   groups: Iterable[str]) -> str:
        try:
            card = parse_card(card_text)
        except FormatError as exc:
            raise UsageError(f"this is not a member card: {exc.detail}") from None
        if card.name != name:
            raise UsageError(f"the card is {card.name}'s, not {name}'s: check who sent it")
        if not card_is_genuine(card):
            raise UsageError(f"the card of {card.name} fails its self-signature: ask them to "
                             "send it again (`secret-broker team card`)")
        if role not in ROLES:
            raise UsageError(f"--role must be one of {', '.join(ROLES)}")
        roster = checkout.team.roster
        if card.name in roster.members:
            raise UsageError(f"{card.name} is already a member; `team grant` changes groups")
        groups = list(groups)
        self.require_groups(checkout, groups)
        change = edit.add_member(checkout.team, card, role, groups, self.actor(checkout))
        return self.commit(checkout, change, f"team: add {card.name} ({role})",
                           "team.member_added", member=card.name, role=role, groups=groups)

    def require_groups(self, checkout: Checkout, groups: Iterable[str]) -> None:
        known = checkout.team.roster.groups
        for group in groups:
            if group not in known:
                raise UsageError(f"team {checkout.config.name} has no group {group!r}; groups: "
                                 f"{', '.join(known) or 'none yet (`team group add G`)'}")

    def require_member(self, checkout: Checkout, name: str) -> Member:
        member = checkout.team.roster.members.get(name)
        if member is None:
            raise NotFound(f"team {checkout.config.name} has no member {name!r}; members: "
                           f"{', '.join(sorted(checkout.team.roster.members))}")
        return member


def read_commit(metadata: Metadata, config: TeamConfig, *, ref: str | None = None,
                since: str | None = None) -> tuple[Repo, str, Verified | Broken]:
    """A team's commit, read from git and verified against what this home pinned and
    remembers. Writes nothing: the caller audits a failure and remembers a success (the
    daemon does both from its own thread)."""
    repo = find_repo(Path(config.path))
    trust = metadata.team_trust(config.name)
    if trust is None:
        raise NotFound(f"team {config.name} is configured but not pinned in this home: "
                       f"run `secret-broker team join` in {config.path}")
    commit = _commit(repo, ref or config.ref)
    try:
        files = repo.files(commit)
        descends = trust.commit is None or _descends(repo, since or trust.commit, commit)
    except GitError as exc:
        raise GitFailed(f"team {config.name}: {exc}", transient=exc.transient) from None
    result = verify_team(trust.fingerprint, Marks(trust.generation, trust.seqs), files,
                         descends=descends)
    if isinstance(result, Verified) and result.team_id != trust.team_id:
        result = Broken(roster_path(1), "fingerprint", "names another team id")
    return repo, commit, result


def remember_commit(metadata: Metadata, team: str, commit: str, result: Verified) -> None:
    marks = result.marks
    metadata.remember_team(team, commit, marks.generation, dict(marks.seqs))


def failure_event(broken: Broken) -> str:
    return "team.rollback_refused" if broken.rule in ("rollback", "vanished") else "team.invalid"


def find_repo(where: Path) -> Repo:
    try:
        return Repo.find(where)
    except GitError as exc:
        raise GitFailed(f"{where} is not inside a git work tree ({exc})") from None


def _commit(repo: Repo, ref: str) -> str:
    try:
        commit = repo.commit_of(ref)
    except GitError as exc:
        raise GitFailed(str(exc)) from None
    if commit is None:
        raise GitFailed(f"{ref} names no commit in {repo.root}")
    return commit


def _descends(repo: Repo, older: str, newer: str) -> bool:
    """Whether `newer` descends from `older`; a commit gone from the repository (a force
    push) counts as not descending."""
    if repo.commit_of(older) is None:
        return False
    return repo.is_ancestor(older, newer)


class TeamChanges:
    """Every change a member can make, each one commit, each audited in this home."""

    def __init__(self, teams: Teams, checkout: Checkout) -> None:
        self.teams, self.checkout = teams, checkout
        self.name = checkout.config.name

    def _admin(self) -> None:
        me = self.checkout.me
        if me is None or me.role != "admin":
            raise UsageError(f"only an admin of team {self.name} can change its roster")

    def _writer(self, group: str) -> None:
        me = self.checkout.me
        if me is None or not me.writes(group):
            raise UsageError(f"you cannot write group {group} of team {self.name}: ask an "
                             "admin (`team grant NAME GROUP` gives writers a group)")

    def remove_member(self, name: str) -> tuple[str, list[str]]:
        self._admin()
        member = self.teams.require_member(self.checkout, name)
        if member.role == "admin" and sum(
                m.role == "admin" for m in self.checkout.team.roster.members.values()) == 1:
            raise UsageError(f"{name} is the last admin: add another admin first")
        refs = edit.readable_refs(self.checkout.team, member)
        commit = self.teams.commit(
            self.checkout, edit.remove_member(self.checkout.team, name,
                                              self.teams.actor(self.checkout)),
            f"team: remove {name}", "team.member_removed", member=name, refs=refs)
        return commit, refs

    def set_groups(self, name: str, group: str, grant: bool) -> tuple[str, list[str]]:
        self._admin()
        self.teams.require_groups(self.checkout, [group])
        member = self.teams.require_member(self.checkout, name)
        groups = set(member.groups) | {group} if grant else set(member.groups) - {group}
        lost = [] if grant or member.role == "admin" else [group]
        refs = edit.readable_refs(self.checkout.team, member, lost) if lost else []
        change = edit.set_groups(self.checkout.team, name, groups, self.teams.actor(self.checkout))
        event = "team.granted" if grant else "team.revoked"
        commit = self.teams.commit(self.checkout, change,
                                   f"team: {'grant' if grant else 'revoke'} {name} {group}",
                                   event, member=name, group=group, refs=refs)
        return commit, refs

    def group(self, group: str, add: bool) -> str:
        self._admin()
        check_name("group", group)
        roster = self.checkout.team.roster
        if add:
            if group in roster.groups:
                raise UsageError(f"team {self.name} has a group {group} already")
            groups = [*roster.groups, group]
        else:
            self.teams.require_groups(self.checkout, [group])
            used = [r for r, s in self.checkout.team.secrets.items() if s.envelope.group == group]
            members = [m.name for m in roster.members.values() if group in m.groups]
            if used or members:
                raise UsageError(f"group {group} still holds {len(used)} secret(s) and "
                                 f"{len(members)} member(s): `team rm` and `team revoke` them "
                                 "first")
            groups = [g for g in roster.groups if g != group]
        change = edit.change_roster(self.checkout.team, self.teams.actor(self.checkout),
                                    groups=groups)
        return self.teams.commit(self.checkout, change,
                                 f"team: {'add' if add else 'remove'} group {group}",
                                 "team.group_added" if add else "team.group_removed",
                                 group=group)

    def set_secret(self, ref: str, group: str, provider: str, kind: str, value: str) -> str:
        self.teams.require_groups(self.checkout, [group])
        self._writer(group)
        if not value:
            raise UsageError("the value is empty; nothing was stored")
        team = self.checkout.team
        existed = ref in team.secrets
        try:
            change = edit.set_secret(team, group, ref, value, self.teams.actor(self.checkout),
                                     provider=provider, kind=kind)
        except FormatError as exc:
            raise UsageError(exc.detail) from None
        return self.teams.commit(self.checkout, change, f"team: {'rotate' if existed else 'add'} "
                                 f"@{ref}", "secret.rotated" if existed else "secret.added",
                                 secret_ref=ref, group=group)

    def remove_secret(self, ref: str) -> str:
        secret = self.checkout.team.secrets.get(ref)
        if secret is None:
            raise SecretNotFound(f"team {self.name} has no secret @{ref}")
        self._writer(secret.envelope.group)
        change = edit.remove_secret(self.checkout.team, ref, self.teams.actor(self.checkout))
        return self.teams.commit(self.checkout, change, f"team: remove @{ref}", "secret.removed",
                                 secret_ref=ref, group=secret.envelope.group)

    def rekey(self, group: str | None) -> str | None:
        if group is None:
            self._admin()
        else:
            self.teams.require_groups(self.checkout, [group])
            self._writer(group)
        team = self.checkout.team
        change = edit.rekey(team, team.roster, self.teams.actor(self.checkout),
                            None if group is None else [group])
        if not change:
            return None
        return self.teams.commit(self.checkout, change, "team: re-encrypt to the roster",
                                 "team.rekeyed", group=group, count=len(change) // 2)
