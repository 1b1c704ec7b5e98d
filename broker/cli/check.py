"""`secret-broker check`: a home's health as findings, each with a one-line fix.

Every check is a small function of one signature, `check(scene) -> list[Finding]`; the
scene reads each file once, on first use; the CLI renders. Checks only read, except
`fix_modes`, which `check --fix` runs first. A check that cannot run (the store does not
unlock, say) becomes a warning naming why, so one problem never hides the others.
"""

from __future__ import annotations

import difflib
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from broker import __version__
from broker.client import BrokerClient
from broker.config import Config, load_config
from broker.core.clock import parse_rfc3339
from broker.core.errors import (
    BrokerError,
    BrokerNotRunning,
    ConfigError,
    InsecureFile,
    SecretNotFound,
)
from broker.core.home import SECRET_FILE_VARS, Home, secret_file_from
from broker.gateway.providers import Provider, build_providers
from broker.service.context import Context
from broker.service.queries import Queries
from broker.service.secrets import Secrets
from broker.service.tokens import Tokens
from broker.store import envelope
from broker.store.metadata import SecretMeta
from broker.store.vault import HEADER, FileVault
from grants import Grant, GrantsError, load_grants

DAY = 86400
UNUSED_TOKEN_DAYS = 30
_RERUN = "fix what the other findings name, then run `secret-broker check` again"


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    check: str
    message: str
    fix: str

    def as_json(self) -> dict[str, str]:
        return {"check": self.check, "message": self.message, "fix": self.fix}


def error(check: str, message: str, fix: str) -> Finding:
    return Finding("error", check, message, fix)


def warning(check: str, message: str, fix: str) -> Finding:
    return Finding("warning", check, message, fix)


class Scene:
    """The home as the checks see it; each piece is read once, on first use."""

    def __init__(self, home: Home, *, now: float | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.now = time.time() if now is None else now
        self.ctx = Context.open(home, environ)

    @cached_property
    def config(self) -> Config:
        """The config, or the defaults when it is invalid (the config check says so)."""
        try:
            return load_config(self.home)
        except ConfigError:
            return Config()

    @cached_property
    def grants(self) -> tuple[Grant, ...] | None:
        """The grants, or None when the file is invalid (the grants check says so)."""
        try:
            return load_grants(self.home.grants)
        except GrantsError:
            return None

    @cached_property
    def providers(self) -> dict[str, Provider] | None:
        """The provider table, or None when config.toml's is invalid (the config check)."""
        try:
            return build_providers(self.config.providers)
        except ConfigError:
            return None

    @cached_property
    def secrets(self) -> list[SecretMeta]:
        return Secrets(self.ctx).all()

    def days_since(self, when: str) -> float:
        return (self.now - (parse_rfc3339(when) or self.now)) / DAY


Check = Callable[[Scene], list[Finding]]


# --- files ------------------------------------------------------------------------------------


def loose_paths(home: Home) -> list[tuple[Path, int]]:
    """Everything in the home that group or others may use, with its mode.

    A link is judged by what it points at, the home itself included, as `serve` judges
    the files it opens; a dangling link has nothing to judge."""
    paths = [home.root]
    for top, dirs, files in os.walk(home.root):
        paths += [Path(top, name) for name in (*dirs, *files)]
    loose = []
    for path in sorted(paths):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue  # a temp file or socket gone since the walk, or a dangling link
        if mode & 0o077:
            loose.append((path, stat.S_IMODE(mode)))
    return loose


def fix_modes(home: Home) -> list[str]:
    """`check --fix`: take group and other permissions away; returns what was done."""
    done = []
    for path, mode in loose_paths(home):
        os.chmod(path, mode & 0o700)
        done.append(f"chmod {mode & 0o700:o} {path}")
    return done


def check_modes(scene: Scene) -> list[Finding]:
    return [error("modes", f"{path} is accessible by group or others (mode {mode:o})",
                  f"chmod {mode & 0o700:o} {path} (or run `secret-broker check --fix`)")
            for path, mode in loose_paths(scene.home)]


def check_env_files(scene: Scene) -> list[Finding]:
    """Passphrase, key and token files the environment names, held to the home's modes."""
    found = []
    for name in SECRET_FILE_VARS:
        try:
            secret_file_from(scene.ctx.environ, name)
        except InsecureFile as exc:
            path = scene.ctx.environ[name]
            found.append(error("modes", exc.message, f"chmod 600 {path}, or unset {name}"))
    return found


def check_config(scene: Scene) -> list[Finding]:
    try:
        load_config(scene.home)
    except ConfigError as exc:
        return [error("config", exc.message,
                      f"edit {scene.home.config}: correct or remove what the message names")]
    return []


def check_grants(scene: Scene) -> list[Finding]:
    try:
        load_grants(scene.home.grants)
    except GrantsError as exc:
        problems = "; ".join(str(p) for p in exc.problems)
        return [error("grants", f"{exc.source} is invalid, so every request is denied: "
                                f"{problems}",
                      "correct the lines named; `secret-broker grants check` shows them")]
    return []


def check_profiles(scene: Scene) -> list[Finding]:
    from broker.service.profiles import load_profiles

    try:
        load_profiles(scene.home.profiles)
    except ConfigError as exc:
        return [error("profiles", exc.message,
                      f"edit {scene.home.profiles}: correct what the message names")]
    return []


def check_kdf(scene: Scene) -> list[Finding]:
    """The vault header, bounds included, read to report rather than to unlock."""
    path = scene.home.vault / HEADER
    try:
        envelope.load_header(path.read_bytes())
    except FileNotFoundError:
        return []  # a keychain home
    except envelope.EnvelopeError as exc:
        return [error("kdf", f"{path}: {exc}",
                      "restore the header from a backup; if it was made weak, move the secrets "
                      "to a new home: export, `init --backend file-vault`, import")]
    return []


def check_audit(scene: Scene) -> list[Finding]:
    verdict = Queries(scene.ctx).verify_audit()
    if verdict.ok:
        return []
    return [error("audit", f"{scene.home.audit} is broken at line {verdict.first_bad_line}: "
                           f"{verdict.reason}",
                  "keep the file as evidence; find who wrote to it; "
                  "`secret-broker audit verify` names the line; once investigated (or for a "
                  "home from before sealed checkpoints), `secret-broker audit verify --reseal`")]


# --- secrets and grants -----------------------------------------------------------------------


def check_values(scene: Scene) -> list[Finding]:
    """Metadata without a stored value; stored values without metadata (file vault only:
    a keychain cannot list its entries)."""
    store = scene.ctx.store
    known = {m.ref for m in scene.secrets}
    if isinstance(store, FileVault):
        stored = set(store.refs())
        missing = sorted(known - stored)
        extra = sorted(stored - known)
    else:
        missing, extra = [], []
        for ref in sorted(known):
            try:
                store.get(ref)
            except SecretNotFound:
                missing.append(ref)
    return [warning("values", f"@{ref} has metadata but no stored value",
                    f"`secret-broker remove @{ref}`, then add or import it again")
            for ref in missing] + [
            warning("values", f"the file vault holds a value for @{ref} with no metadata",
                    f"import @{ref} again, or delete its file under {scene.home.vault}")
            for ref in extra]


def check_grant_refs(scene: Scene) -> list[Finding]:
    if scene.grants is None:
        return []
    known = {m.ref for m in scene.secrets}
    prefixes = tuple(t.ref_prefix for t in scene.config.teams.values())
    named = {g.secret_ref for g in scene.grants}
    path = scene.home.grants
    return [warning("grants", f"grant {g.index} (line {g.line}) names @{g.secret_ref}, "
                              "which is not stored",
                    f"add @{g.secret_ref}, or delete that grant from {path}")
            for g in scene.grants if g.secret_ref not in known
            and not (prefixes and g.secret_ref.startswith(prefixes))] + [
            warning("grants", f"no grant names @{ref}, so nothing can use it through the broker",
                    f"add a [[grants]] table with secret_ref = \"{ref}\" to {path}, "
                    f"or `secret-broker remove @{ref}`")
            for ref in sorted(known - named)]


def purpose_warnings(grants: Iterable[Grant], providers: Mapping[str, Provider],
                     path: Path) -> list[Finding]:
    """Grant purposes that no gateway route asks for. Legal (a native lease may name any
    purpose), but usually a typo: "embeddings" for "llm.embeddings" denies every request."""
    routed = sorted({route.purpose for p in providers.values() for route in p.routes})
    found = []
    for g in grants:
        for purpose in g.purposes:
            if purpose in routed:
                continue
            where = f"grant {g.index} (line {g.line})"
            close = difflib.get_close_matches(purpose, routed, n=1)
            fix = (f'replace "{purpose}" with "{close[0]}" in {where} of {path}' if close else
                   f'keep it only for leases that ask for purpose "{purpose}" by name')
            found.append(warning("grants", f'{where} allows purpose "{purpose}", which no '
                                           f"gateway route uses ({', '.join(routed)})", fix))
    return found


def check_purposes(scene: Scene) -> list[Finding]:
    if scene.grants is None or scene.providers is None:
        return []
    return purpose_warnings(scene.grants, scene.providers, scene.home.grants)


def check_provider_hosts(scene: Scene) -> list[Finding]:
    """A provider whose secrets have grants, none of which allows its upstream host (a
    secret with no grant at all is reported by check_grant_refs)."""
    if scene.grants is None or scene.providers is None:
        return []
    found = []
    for name, provider in sorted(scene.providers.items()):
        refs = {m.ref for m in scene.secrets
                if m.provider == name or m.ref == provider.secret_ref}
        hosts = {h for g in scene.grants if g.secret_ref in refs for h in g.allowed_hosts}
        if hosts and provider.host not in hosts:
            found.append(warning(
                "providers", f"no grant for {', '.join('@' + r for r in sorted(refs))} allows "
                             f"{provider.host}, so /proxy/{name}/ requests are denied",
                f'add "{provider.host}" to allowed_hosts of a grant in {scene.home.grants}'))
    return found


def check_rotation(scene: Scene) -> list[Finding]:
    limit = scene.config.rotate_after_days
    found = []
    for meta in scene.secrets:
        since = meta.rotated_at or meta.created_at
        age = scene.days_since(since)
        if age > limit:
            found.append(warning(
                "rotation", f"@{meta.ref} was last set {int(age)} days ago ({since}); "
                            f"the limit is {limit}",
                f"`secret-broker rotate @{meta.ref} --stdin` (or raise [check] "
                "rotate_after_days in config.toml)"))
    return found


def check_tokens(scene: Scene) -> list[Finding]:
    found = []
    for t in Tokens(scene.ctx).all():
        if t.revoked_at is not None:
            continue
        who = f"token {t.id} (consumer {t.consumer})"
        fix = f"`secret-broker token revoke {t.id}`"
        if t.expires_at is not None and scene.days_since(t.expires_at) > 0:
            found.append(warning("tokens", f"{who} expired at {t.expires_at}", fix))
        elif scene.days_since(t.last_used_at or t.created_at) > UNUSED_TOKEN_DAYS:
            found.append(warning(
                "tokens", f"{who} has not been used in {UNUSED_TOKEN_DAYS} days "
                          f"(last: {t.last_used_at or 'never'})", fix))
    return found


def check_daemon(scene: Scene) -> list[Finding]:
    try:
        running = BrokerClient(socket_path=scene.home.socket, timeout=5.0).health()
    except BrokerNotRunning:
        return [warning("daemon", "the broker is not running", "`secret-broker start`")]
    if running.get("version") != __version__:
        return [warning("daemon", f"the running broker is version {running.get('version')}, "
                                  f"this command is {__version__}",
                        "`secret-broker stop && secret-broker start`")]
    return []


def check_teams(scene: Scene) -> list[Finding]:
    """Every configured team: its verification, the guard's scan, rotations due."""
    if not scene.config.teams:
        return []
    from broker.service.team_check import check_team  # only homes with teams pay for age

    findings = []
    for name, team in sorted(scene.config.teams.items()):
        report = check_team(team.path, name, ci=False)
        fix = f"see `secret-broker team check --team {name}`"
        findings += [error("team", f"the local secret @{m.ref} has the name of a ref team "
                                   f"{name} serves (prefix {team.ref_prefix}): neither is "
                                   "served under that name",
                           f"rename the local one: add it under another name, then "
                           f"`secret-broker remove @{m.ref}`")
                     for m in scene.secrets if m.ref.startswith(team.ref_prefix)]
        findings += [error("team", f"team {name}: {e}", fix) for e in report["errors"]]
        findings += [warning("team", f"team {name}: {w}", fix) for w in report["warnings"]]
    return findings


CHECKS: tuple[Check, ...] = (
    check_modes, check_env_files, check_config, check_grants, check_profiles, check_kdf,
    check_audit, check_values, check_grant_refs, check_purposes, check_provider_hosts,
    check_rotation, check_tokens, check_daemon, check_teams,
)


def run(scene: Scene, checks: tuple[Check, ...] = CHECKS) -> list[Finding]:
    findings = []
    for check in checks:
        try:
            findings += check(scene)
        except BrokerError as exc:
            name = check.__name__.removeprefix("check_")
            findings.append(warning(name, f"not checked: {exc.message}", _RERUN))
    return findings
