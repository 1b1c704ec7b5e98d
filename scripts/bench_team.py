#!/usr/bin/env python3
"""Team vault speed: re-encrypting 200 secrets to 10 recipients, and verifying that checkout.

Builds a team (one admin, eight readers, 200 secrets in one group), then adds a tenth
member, which re-encrypts and re-signs all 200 (what `team member add` and `team rekey`
do), and verifies the result: in memory, and read from a real git commit (`git ls-tree`
and one `git cat-file --batch`, as every command and `check` read it). Prints the best of
`--runs` for each; the targets are 2 s and 1 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.team import edit
from broker.team.gitrepo import Repo
from broker.team.keys import Identity
from broker.team.verify import Marks, Verified, verify_team

SECRETS, MEMBERS = 200, 10
T = TypeVar("T")


def verified(files: dict[str, bytes]) -> Verified:
    result = verify_team(None, Marks(), files)
    assert isinstance(result, Verified), result
    return result


def build() -> tuple[dict[str, bytes], edit.Actor]:
    admin = edit.Actor("admin", Identity.generate(), "2026-12-05T00:00:00Z")
    files = edit.apply({}, edit.new_team("a" * 32, "bench", admin))
    files = edit.apply(files, edit.change_roster(verified(files), admin, groups=["llm"]))
    for i in range(MEMBERS - 2):
        card = Identity.generate().card(f"reader{i}")
        files = edit.apply(files, edit.add_member(verified(files), card, "reader", ["llm"], admin))
    team = verified(files)
    change: edit.Files = {}
    for i in range(SECRETS):
        change.update(edit.set_secret(team, "llm", f"key_{i:03d}", f"sk-bench-{i:04d}" * 3,
                                      admin, provider="openai", kind="api_key"))
    return edit.apply(files, change), admin


def best(runs: int, job: Callable[[], T]) -> tuple[float, T]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = job()
        times.append(time.perf_counter() - started)
    assert result is not None
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    files, admin = build()
    team = verified(files)
    newcomer = Identity.generate().card("newcomer")
    rekey_s, change = best(args.runs, lambda: edit.add_member(team, newcomer, "reader",
                                                              ["llm"], admin))
    after = edit.apply(files, change)
    rekeyed = sum(1 for path in change if path.endswith(".age"))
    verify_s, result = best(args.runs, lambda: verified(after))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
               "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}
        subprocess.run(["git", "init", "-q", tmp], check=True, env=env)
        for path, data in after.items():
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / path).write_bytes(data)
        subprocess.run(["git", "add", "-A"], cwd=tmp, check=True, env=env)
        subprocess.run(["git", "commit", "-q", "-m", "bench"], cwd=tmp, check=True, env=env)
        repo = Repo(Path(tmp))
        head = repo.commit_of("HEAD")
        assert head is not None
        load_s, _ = best(args.runs, lambda: verified(repo.files(head)))
    print(f"team: {SECRETS} secrets, {len(result.roster.members)} members "
          f"({sys.platform}, {os.cpu_count()} cores, best of {args.runs})")
    print(f"re-encrypt and re-sign {rekeyed} secrets to {len(result.roster.members)} "
          f"recipients (member add): {rekey_s:.2f} s   (target < 2 s)")
    print(f"verify the checkout in memory:            {verify_s:.2f} s   (target < 1 s)")
    print(f"read it from git and verify (as commands do): {load_s:.2f} s   (target < 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
