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
from broker.team.format import DIR, FormatError, Member, roster_path, sha256
from broker.team.gitrepo import GitError, Repo
from broker.team.keys import BadKey, Identity
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
        head = commit_of(repo, "HEAD")
        if head != checkout.commit:
            raise GitFailed(f"HEAD ({head[:12]}) is not the commit verified for this change "
                            f"({checkout.commit[:12]}); check out the team's branch")
        files = edit.apply(repo.files(head), change)
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
        commit = commit_of(repo, "HEAD")
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
    commit = commit_of(repo, ref or config.ref)
    try:
        files = repo.files(commit)
        follows = trust.commit is None or descends(repo, since or trust.commit, commit)
    except GitError as exc:
        raise GitFailed(f"team {config.name}: {exc}", transient=exc.transient) from None
    result = verify_team(trust.fingerprint, Marks(trust.generation, trust.seqs), files,
                         descends=follows)
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


def commit_of(repo: Repo, ref: str) -> str:
    try:
        commit = repo.commit_of(ref)
    except GitError as exc:
        raise GitFailed(str(exc)) from None
    if commit is None:
        raise GitFailed(f"{ref} names no commit in {repo.root}")
    return commit


def descends(repo: Repo, older: str, newer: str) -> bool:
    """Whether `newer` descends from `older`; a commit gone from the repository (a force
    push) counts as not descending."""
    if repo.commit_of(older) is None:
        return False
    return repo.is_ancestor(older, newer)
