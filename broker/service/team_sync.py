"""Following a team's remote: `team pull`, `team sync` and `team trust-reset`.

Nothing moves the checkout before what would be served is verified: a pull verifies the
fetched commit before it fast-forwards, a sync verifies theirs and ours together before it
pushes (and puts the checkout back if that fails), and a trust-reset is audited.
"""

from __future__ import annotations

from pathlib import Path

from broker.config import TeamConfig
from broker.core.errors import GitFailed, NotFound, TeamInvalid
from broker.service.team import Teams, commit_of, descends, find_repo
from broker.team.gitrepo import GitError, Repo
from broker.team.verify import Broken, Marks, Verified, verify_team


class TeamSync:
    """One home's view of a team's remote."""

    def __init__(self, teams: Teams) -> None:
        self.teams = teams

    def pull(self, config: TeamConfig) -> tuple[str, str]:
        """Fetch, verify what came in, fast-forward; (old, new) commit. A non-fast-forward
        (GitFailed, exit 1) or an invalid commit (TeamInvalid, exit 5) changes nothing."""
        checkout = self.teams.load(config, ref="HEAD")
        repo = checkout.repo
        if repo.busy():
            raise GitFailed(f"{repo.root} is in the middle of {repo.busy()}: finish it first")
        try:
            upstream = repo.upstream()
            repo.git("fetch", "--quiet", upstream.split("/", 1)[0])
        except GitError as exc:
            raise GitFailed(f"cannot fetch team {config.name}: {exc}") from None
        new = commit_of(repo, upstream)
        if not repo.is_ancestor(checkout.commit, new):
            if repo.is_ancestor(new, checkout.commit):
                return checkout.commit, checkout.commit  # nothing new; ours is ahead
            raise GitFailed(f"{upstream} is not a fast-forward of this checkout (both have "
                            "new commits): run `secret-broker team sync` to rebase yours")
        self.teams.load(config, ref=new)  # verifies (and remembers) before the checkout moves
        try:
            repo.git("merge", "--quiet", "--ff-only", new)
        except GitError as exc:
            raise GitFailed(f"cannot fast-forward {repo.root}: {exc}") from None
        if new != checkout.commit:
            self.teams.ctx.record("team.pulled", team=config.name, commit=new)
        return checkout.commit, new

    def sync(self, config: TeamConfig) -> str:
        """Pull (rebasing this member's unpushed team commits), verify, push."""
        checkout = self.teams.load(config, ref="HEAD")
        repo, old = checkout.repo, checkout.commit
        try:
            upstream = repo.upstream()
            remote, _, branch = upstream.partition("/")
            fetched_before = repo.commit_of(upstream)
            repo.git("fetch", "--quiet", remote)
            new = commit_of(repo, upstream)
            if fetched_before is not None and not descends(repo, fetched_before, new):
                raise TeamInvalid(f"{upstream} was rewritten (it no longer holds commit "
                                  f"{fetched_before[:12]}); if that was deliberate, run "
                                  "`secret-broker team trust-reset --to COMMIT`")
            if repo.is_ancestor(old, new):  # nothing of ours to rebase
                self.teams.load(config, ref=new)
                repo.git("merge", "--quiet", "--ff-only", new)
            elif not repo.is_ancestor(new, old):
                self._rebase(repo, new)
                try:  # theirs and ours together, as the next reader will verify them
                    self.teams.load(config, ref="HEAD", since=new)
                except TeamInvalid:
                    repo.git("reset", "--quiet", "--hard", old)
                    raise
            head = commit_of(repo, "HEAD")
        except GitError as exc:
            raise GitFailed(f"cannot sync team {config.name}: {exc}") from None
        try:
            repo.git("push", "--quiet", remote, f"HEAD:{branch}")
        except GitError as exc:
            raise GitFailed(f"the remote refused the push ({exc}); your team commits are "
                            "still here, verified: fix what it says and run `secret-broker "
                            "team sync` again") from None
        self.teams.ctx.record("team.synced", team=config.name, commit=head)
        return head

    @staticmethod
    def _rebase(repo: Repo, onto: str) -> None:
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
        target = commit_of(repo, commit)
        trust = self.teams.ctx.metadata.team_trust(config.name)
        if trust is None:
            raise NotFound(f"team {config.name} is not pinned in this home")
        result = verify_team(trust.fingerprint, Marks(), repo.files(target))
        if isinstance(result, Broken):
            raise TeamInvalid(f"commit {target[:12]} does not verify: {result.message}")
        marks = result.marks
        self.teams.ctx.metadata.remember_team(config.name, target, marks.generation,
                                              dict(marks.seqs), reset=True)
        self.teams.ctx.record("team.trust_reset", team=config.name, commit=target,
                        previous=trust.commit)
        return result
