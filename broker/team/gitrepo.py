"""The team's git repository, driven through the `git` command line.

Reads take committed objects only (`ls-tree`, `cat-file` of a commit), never the working
tree, so an unfinished pull, a conflict or an uncommitted edit is never trusted. Every call
runs with a fixed environment: no prompt for credentials, the C locale (messages we can
read), no replace objects (which could swap a verified commit's content), and a timeout.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from broker.team.format import DIR

TIMEOUT = 120.0


class GitError(Exception):
    """git failed or is missing; the message says which command and git's own words."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # a lock file, a pull in progress: try again later


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")
           or k in ("GIT_SSH_COMMAND", "GIT_SSH", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL",
                    "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "GIT_CONFIG_GLOBAL",
                    "GIT_CONFIG_NOSYSTEM")}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_NO_REPLACE_OBJECTS="1",
               GIT_OPTIONAL_LOCKS="0")
    return env


class Repo:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def find(cls, start: Path) -> Repo:
        """The work tree that holds `start`."""
        out = _git(start, "rev-parse", "--show-toplevel").strip()
        return cls(Path(out))

    def git(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        return _git(self.root, *args, stdin=stdin, check=check)

    def git_bytes(self, *args: str) -> bytes:
        return _run(self.root, list(args))

    def commit_of(self, ref: str = "HEAD") -> str | None:
        """The commit `ref` names, or None when it names none (a repository with no commit)."""
        out = self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return out.strip() or None

    def files(self, commit: str) -> dict[str, bytes]:
        """Every file under .sbteam/ in `commit`, read from the object store."""
        listing = self.git("ls-tree", "-r", "-z", "--full-tree", commit, "--", DIR)
        entries = []
        for item in filter(None, listing.split("\0")):
            meta, _, path = item.partition("\t")
            mode, kind, sha = meta.split()
            if kind != "blob" or mode not in ("100644", "100755"):
                raise GitError(f"{path} in commit {commit[:12]} is not a plain file ({kind} "
                               f"{mode}); a team vault holds files only")
            entries.append((path, sha))
        if not entries:
            return {}
        batch = _run(self.root, ["cat-file", "--batch"],
                     stdin="".join(f"{sha}\n" for _, sha in entries).encode())
        out: dict[str, bytes] = {}
        pos = 0
        for path, _sha in entries:
            header_end = batch.index(b"\n", pos)
            size = int(batch[pos:header_end].split()[2])
            start = header_end + 1
            out[path] = batch[start:start + size]
            pos = start + size + 1
        return out

    def is_ancestor(self, older: str, newer: str) -> bool:
        proc = _proc(self.root, ["merge-base", "--is-ancestor", older, newer])
        if proc.returncode not in (0, 1):
            raise GitError(f"git merge-base failed: {_words(proc)}")
        return proc.returncode == 0

    def commit_time(self, commit: str) -> int:
        return int(self.git("show", "-s", "--format=%ct", commit).strip())

    def dirty(self, paths: Sequence[str] = (DIR,)) -> list[str]:
        """Paths under `paths` with changes not committed (staged, unstaged, untracked)."""
        out = self.git("status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *paths)
        return [item[3:] for item in out.split("\0") if len(item) > 3]

    def busy(self) -> str | None:
        """What git is in the middle of (a merge, a rebase), or None."""
        git_dir = Path(self.git("rev-parse", "--absolute-git-dir").strip())
        for name, what in (("MERGE_HEAD", "a merge"), ("rebase-merge", "a rebase"),
                           ("rebase-apply", "a rebase"), ("CHERRY_PICK_HEAD", "a cherry-pick")):
            if (git_dir / name).exists():
                return what
        return None

    def write_and_commit(self, changes: Mapping[str, bytes | None], message: str,
                         author: str) -> str:
        """Write these files, commit exactly them, and return the commit. On any failure the
        files go back to what HEAD holds, so the checkout is as it was."""
        paths = sorted(changes)
        try:
            for path, data in changes.items():
                target = self.root / path
                if data is None:
                    target.unlink(missing_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.git("add", "-A", "--", *paths)
            ident = self._identity(author)
            self.git(*ident, "commit", "--quiet", "--no-verify", "-m", message, "--", *paths)
        except (GitError, OSError):
            self.restore(paths)
            raise
        head = self.commit_of("HEAD")
        assert head is not None
        return head

    def restore(self, paths: Sequence[str]) -> None:
        """Put `paths` back as HEAD holds them (new files removed)."""
        has_head = self.commit_of("HEAD") is not None
        for path in paths:
            if has_head and self.git("ls-tree", "HEAD", "--", path).strip():
                self.git("reset", "--quiet", "HEAD", "--", path, check=False)
                self.git("checkout", "HEAD", "--", path, check=False)
            else:
                self.git("rm", "--cached", "--quiet", "--ignore-unmatch", "--", path,
                         check=False)
                (self.root / path).unlink(missing_ok=True)

    def _identity(self, author: str) -> list[str]:
        """Commit as the user git knows, else as the member (git needs a name and email)."""
        if self.git("config", "user.email", check=False).strip():
            return []
        return ["-c", f"user.name={author}", "-c", f"user.email={author}@sbteam.invalid"]

    def upstream(self) -> str:
        out = self.git("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}",
                       check=False).strip()
        if not out:
            raise GitError("the current branch has no upstream: set one with "
                           "`git branch --set-upstream-to origin/main`")
        return out


def _proc(cwd: Path, args: list[str], stdin: bytes | None = None
          ) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=_env(), input=stdin,
                              capture_output=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        raise GitError("git is not installed (team vaults need the `git` command)") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} took longer than {TIMEOUT:.0f} s", transient=True) from None
    except NotADirectoryError:
        raise GitError(f"{cwd} is not a directory") from None


def _words(proc: subprocess.CompletedProcess[bytes]) -> str:
    """git's own explanation: its error lines and what the remote said, at most four."""
    text = (proc.stderr or proc.stdout).decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines()
             if line.startswith(("error:", "fatal:", "remote:", " ! "))] or text.splitlines()
    return " / ".join(lines[-4:]) if lines else f"exit {proc.returncode}"


def _run(cwd: Path, args: list[str], stdin: bytes | None = None) -> bytes:
    proc = _proc(cwd, args, stdin)
    if proc.returncode != 0:
        words = _words(proc)
        raise GitError(f"git {args[0]} failed: {words}", transient=".lock" in words)
    return proc.stdout


def _git(cwd: Path, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
    if not check:
        return _proc(cwd, list(args), stdin).stdout.decode("utf-8", "replace")
    return _run(cwd, list(args), stdin).decode("utf-8", "replace")
