"""The pre-commit guard: install it in a repository's hook, and scan what is about to be
committed (the index, never the working tree: a key staged then deleted from disk is still
in the commit)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from broker.core.errors import BrokerError, GitFailed
from broker.core.home import Home
from broker.service.context import Context
from broker.service.secrets import Secrets
from broker.team.format import DIR
from broker.team.gitrepo import GitError, Repo
from broker.team.guard import Finding, scan_blob, scan_team_files

HOOK_LINE = "secret-broker team hook run || exit 1"
HOOK_COMMENT = "# secret-broker: refuse keys, tokens and stored values (and fail without it)"


def index_files(repo: Repo, *, staged_only: bool) -> dict[str, bytes]:
    """Files as the index holds them: every tracked file, or only those staged to change."""
    try:
        if staged_only:
            names = repo.git("diff", "--cached", "--name-only", "-z", "--no-renames",
                             "--diff-filter=ACMRT").split("\0")
            wanted = {n for n in names if n}
        listing = repo.git("ls-files", "--stage", "-z").split("\0")
        entries = []
        for item in filter(None, listing):
            meta, _, path = item.partition("\t")
            mode, sha, _stage = meta.split()
            if mode.startswith("160") or (staged_only and path not in wanted
                                          and not path.startswith(DIR + "/")):
                continue  # a submodule is no file; unchanged files were scanned before
            entries.append((path, sha))
        return {path: repo.git_bytes("cat-file", "blob", sha) for path, sha in entries}
    except GitError as exc:
        raise GitFailed(f"cannot read the index of {repo.root}: {exc}") from None


def scan(repo: Repo, stored_values: list[str], *, staged_only: bool) -> list[Finding]:
    files = index_files(repo, staged_only=staged_only)
    team_files = {p: d for p, d in files.items() if p.startswith(DIR + "/")}
    found = scan_team_files(team_files)
    for path, data in sorted(files.items()):
        if path.startswith(DIR + "/") and path.endswith(".age"):
            continue  # ciphertext: scanning it finds only noise
        found.extend(scan_blob(path, data, stored_values))
    return found


def hooks_dir(repo: Repo) -> Path:
    """Where git looks for hooks here: core.hooksPath when set, else .git/hooks."""
    path = Path(repo.git("rev-parse", "--git-path", "hooks").strip())
    return path if path.is_absolute() else repo.root / path


def install(repo: Repo) -> tuple[Path, bool]:
    """Put the guard at the top of the pre-commit hook, before anything already there (a
    hook that ends in `exit 0` must not skip it). (path, whether it changed)."""
    hook = hooks_dir(repo) / "pre-commit"
    old = hook.read_text() if hook.exists() else ""
    if HOOK_LINE in old:
        return hook, False
    lines = old.splitlines(keepends=True)
    shebang = lines.pop(0) if lines and lines[0].startswith("#!") else "#!/bin/sh\n"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(shebang + f"{HOOK_COMMENT}\n{HOOK_LINE}\n" + "".join(lines))
    hook.chmod(0o755)
    return hook, True


def uninstall(repo: Repo) -> tuple[Path, bool]:
    hook = hooks_dir(repo) / "pre-commit"
    if not hook.exists() or HOOK_LINE not in hook.read_text():
        return hook, False
    kept = [line for line in hook.read_text().splitlines(keepends=True)
            if line.strip() not in (HOOK_LINE, HOOK_COMMENT)]
    if all(line.startswith("#!") or not line.strip() for line in kept):
        hook.unlink()
    else:
        hook.write_text("".join(kept))
    return hook, True


def installed(repo: Repo) -> bool:
    hook = hooks_dir(repo) / "pre-commit"
    with contextlib.suppress(OSError):
        return HOOK_LINE in hook.read_text() and os.access(hook, os.X_OK)
    return False


def stored_values_of_this_home() -> list[str]:
    """The values this machine's store holds, if there is a home and it unlocks without a
    prompt; else none (the guard still runs every other rule)."""
    home = Home.from_env()
    if not home.config.exists():
        return []
    try:
        ctx = Context.open(home)
        secrets = Secrets(ctx)
        return [secrets.value(m.ref) for m in ctx.metadata.all()]
    except (BrokerError, OSError):
        return []
