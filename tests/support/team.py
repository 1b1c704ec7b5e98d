"""Team vault worlds for tests: a bare remote, and per member a clone and a home.

alice is the admin, bob a writer of `llm`, ci a reader host of `llm`; `llm` holds
@openai_api_key (VALUE) and `prod` holds @db_password (VALUE_2).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.core.home import Home
from broker.service.context import Context
from broker.service.team import Teams
from broker.team.format import roster_path
from tests.conftest import Cli, base_env, new_home

# One world is built per run and shared by the xdist workers, so its canaries are the run's.
RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
VALUE = "sk-team-canary-" + hashlib.sha256(f"{RUN_ID}/1".encode()).hexdigest()[:32]
VALUE_2 = "sk-team-canary2-" + hashlib.sha256(f"{RUN_ID}/2".encode()).hexdigest()[:32]
OPENAI = ".sbteam/secrets/llm/openai_api_key"
REMOTE = "remote.git"  # the bare repository every clone pushes to, in the world's root
SHA_K = ["sh", "-c", 'printf %s "$K" | sha256sum']
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def git(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, check=False, timeout=60)
    assert proc.returncode == 0 or not check, f"git {args}: {proc.stderr}"
    return proc.stdout


@dataclass
class Member:
    name: str
    cli: Cli
    clone: Path

    def team(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.cli("team", *args, "--dir", str(self.clone), **kw)  # type: ignore[arg-type]

    def ok(self, *args: str, **kw: object) -> str:
        proc = self.team(*args, **kw)
        assert proc.returncode == 0, f"team {args}: exit {proc.returncode}\n{proc.stdout}" \
                                     f"{proc.stderr}"
        return proc.stdout

    def digest(self, ref: str = "@acme.openai_api_key") -> str:
        return self.cli.ok("exec", "--env", f"K={ref}", "--", *SHA_K).split()[0]

    def exec_code(self, ref: str = "@acme.openai_api_key") -> int:
        return self.cli("exec", "--env", f"K={ref}", "--", "true").returncode

    def identity(self) -> object:
        ctx = Context.open(Home(self.cli.home), self.cli.env)
        return Teams(ctx).identity()


@dataclass
class World:
    root: Path
    remote: Path
    members: dict[str, Member] = field(default_factory=dict)
    fingerprint: str = ""

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    def outputs(self) -> list[str]:
        return [text for m in self.members.values() for text in m.cli.outputs]


def member_at(root: Path, name: str, outputs: list[str] | None = None) -> Member:
    """A member of the world at `root`: its home and clone's places, and a CLI on the home."""
    home = root / f"home-{name}"
    return Member(name, Cli(home, base_env(home, **GIT_ENV), list(outputs or [])), root / name)


def new_member(world: World, name: str) -> Member:
    member = member_at(world.root, name)
    new_home(member.cli.home, member.cli.env)
    git(world.root, "clone", "-q", str(world.remote), str(member.clone))
    world.members[name] = member
    return member


def add_reader(world: World, name: str, role: str, groups: list[str], host: bool = False
               ) -> Member:
    member = new_member(world, name)
    out = member.ok("join", "--fingerprint", world.fingerprint, "--as", name,
                    *(["--host"] if host else []))
    card = out.strip().splitlines()[-1]
    alice = world["alice"]
    alice.ok("member", "add", name, "--card", card, "--role", role,
             *[a for g in groups for a in ("--group", g)])
    alice.ok("sync")
    member.ok("pull")
    return member


def build_world(root: Path) -> World:
    remote = root / REMOTE
    git(root, "init", "-q", "--bare", "--initial-branch=main", str(remote))
    world = World(root, remote)
    alice = new_member(world, "alice")
    git(alice.clone, "checkout", "-q", "-b", "main")
    git(alice.clone, "commit", "-q", "--allow-empty", "-m", "start")
    git(alice.clone, "push", "-q", "-u", "origin", "main")
    out = alice.ok("init", "--name", "acme", "--as", "alice")
    world.fingerprint = out.split("fingerprint: ", 1)[1].splitlines()[0]
    alice.ok("group", "add", "llm")
    alice.ok("group", "add", "prod")
    alice.ok("set", "@openai_api_key", "--group", "llm", "--provider", "openai", "--stdin",
             input=VALUE)
    alice.ok("set", "@db_password", "--group", "prod", "--provider", "postgres", "--kind",
             "password", "--stdin", input=VALUE_2)
    alice.ok("sync")
    add_reader(world, "bob", "writer", ["llm"])
    add_reader(world, "ci", "reader", ["llm"], host=True)
    for m in world.members.values():
        m.ok("pull")
    return world


def add_local_clash(member: Member, ref: str, value: str) -> None:
    """A local secret under a name the team serves, as a home gets one when a team is
    configured after it (`add` refuses such a name while the team is configured)."""
    config = member.cli.home / "config.toml"
    text = config.read_text()
    config.write_text(text.replace('[teams.acme]\n', '[teams.acme]\nprefix = "not-yet."\n'))
    try:
        member.cli.add(ref, value)
    finally:
        config.write_text(text)


def copy_world(template: World, root: Path) -> World:
    """A fresh world, copied from a built one: homes, clones and remote as files, with the
    paths that name them (config.toml's team path, each clone's origin) moved along."""
    shutil.copytree(template.root, root, symlinks=True, dirs_exist_ok=True)
    old, new = str(template.root), str(root)
    world = World(root, root / template.remote.name, fingerprint=template.fingerprint)
    for name, member in template.members.items():
        copied = member_at(root, name, member.cli.outputs)
        config = copied.cli.home / "config.toml"
        config.write_text(config.read_text().replace(old, new))
        git(copied.clone, "remote", "set-url", "origin", str(world.remote))
        world.members[name] = copied
    return world


# --- tampering as an attacker with push access would: plain git and file edits ------------


def write_file(repo: Path, path: str, data: bytes) -> None:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_bytes(data)


def _edit_json(repo: Path, path: str, **changes: object) -> None:
    doc = json.loads((repo / path).read_text())
    doc.update(changes)
    (repo / path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _other_genesis(world: World) -> bytes:
    other = world.root / "other"
    git(world.root, "init", "-q", str(other))
    eve = Cli(world.root / "home-eve", base_env(world.root / "home-eve", **GIT_ENV))
    eve.ok("init", "--backend", "file-vault")
    eve.ok("team", "init", "--name", "acme", "--as", "alice", "--dir", str(other))
    return (other / roster_path(1)).read_bytes()


TAMPER = {
    "format": lambda w, c: write_file(c, ".sbteam/FORMAT", b"sb-team/2\n"),
    "parse": lambda w, c: _edit_json(c, OPENAI + ".json", extra="x"),
    "unknown-file": lambda w, c: write_file(c, ".sbteam/notes.txt", b"hello"),
    "fingerprint": lambda w, c: write_file(c, roster_path(1), _other_genesis(w)),
    "roster-chain": lambda w, c: (c / roster_path(2)).unlink(),
    "roster-signature": lambda w, c: _edit_json(c, roster_path(2), created_at="2020-01-01"),
    "envelope-signature": lambda w, c: _edit_json(c, OPENAI + ".json", provider="evil"),
    "binding": lambda w, c: [shutil.copy(c / (OPENAI + s), c / f".sbteam/secrets/llm/x{s}")
                             for s in (".age", ".json")],
    "age-digest": lambda w, c: shutil.copy(c / ".sbteam/secrets/prod/db_password.age",
                                           c / (OPENAI + ".age")),
    "pairing": lambda w, c: (c / (OPENAI + ".age")).unlink(),
    "vanished": lambda w, c: [(c / (OPENAI + s)).unlink() for s in (".age", ".json")],
}


def blob(repo: Path, spec: str) -> bytes:
    return subprocess.run(["git", "show", spec], cwd=repo, capture_output=True, check=True,
                          env={**os.environ, **GIT_ENV}).stdout


# --- fixtures: import them into a test module to use them ----------------------------------


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Built once per run (about 40 CLI calls) by the first worker that asks, under a lock;
    the others read it back. Each test gets its own copy. pytest removes old temp dirs."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the run's directory, above each worker's own
    root, saved = shared / "team-world", shared / "team-world.json"
    fd = os.open(shared / "team-world.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not saved.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed build left
            root.mkdir()
            world = build_world(root)
            saved.write_text(json.dumps({"fingerprint": world.fingerprint, "members": {
                name: m.cli.outputs for name, m in world.members.items()}}))
    finally:
        os.close(fd)
    doc = json.loads(saved.read_text())
    world = World(root, root / REMOTE, fingerprint=doc["fingerprint"])
    for name, outputs in doc["members"].items():
        world.members[name] = member_at(root, name, outputs)
    return world


@pytest.fixture
def world(template: World) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="sbt-", dir="/tmp"))
    yield copy_world(template, root)
    shutil.rmtree(root, ignore_errors=True)
