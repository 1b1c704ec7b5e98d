"""`profiles.toml`: named environments a supervisor launches plugins with.

Strict like the grants loader: an unknown key or a wrong type is an error naming it, so a
typo never launches a plugin with less (or more) than the owner meant. Values are never
quoted in errors: a pasted key instead of a ref must not be echoed to a terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.core.errors import ConfigError, Denied, NotFound, UsageError
from broker.core.refs import REF_RE, parse_ref
from broker.service.envfile import ENV_NAME_RE, LOADER_REASON, is_loader_var
from broker.service.template import ref_template
from grants import AccessRequest, Deny, Grant, decide, tomlfile

PROFILE_KEYS = ("consumer", "env")


@dataclass(frozen=True, slots=True)
class Profile:
    """One `[profiles.NAME]` table, validated."""

    name: str
    consumer: str
    env: tuple[tuple[str, str], ...]  # (VAR, ref without "@"), in file order

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ref for _, ref in self.env))

    def templates(self) -> dict[str, str]:
        """VAR -> template, the form `exec` resolves and renders every environment in."""
        return {var: ref_template(ref) for var, ref in self.env}


def parse_profiles(text: str, source: str = "profiles.toml") -> dict[str, Profile]:
    """Parse and validate; a ConfigError lists every problem, each naming its key."""
    try:
        doc = tomlfile.parse(text)
    except tomlfile.TomlFileError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    problems = [f"unknown top-level key '{key}' (only [profiles.NAME] tables belong here)"
                for key in doc if key != "profiles"]
    tables = doc.get("profiles", {})
    if not isinstance(tables, dict):
        problems.append("'profiles' must hold tables written as [profiles.NAME]")
        tables = {}
    profiles = {name: _profile(name, table, problems) for name, table in tables.items()}
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return profiles


def _profile(name: str, table: Any, problems: list[str]) -> Profile:
    key = f"profiles.{name}"
    if not REF_RE.fullmatch(name):
        problems.append(f"{key}: a profile name is 1-128 of A-Z a-z 0-9 _ . -")
    if not isinstance(table, dict):
        problems.append(f"{key}: must be a table, [profiles.{name}]")
        return Profile(name, "", ())
    problems += [f"{key}.{k}: unknown key (expected {', '.join(PROFILE_KEYS)})"
                 for k in table if k not in PROFILE_KEYS]
    problems += [f"{key}.{k}: missing" for k in PROFILE_KEYS if k not in table]
    consumer = table.get("consumer", "")
    if "consumer" in table and not (isinstance(consumer, str) and REF_RE.fullmatch(consumer)):
        problems.append(f"{key}.consumer: must be a string of 1-128 of A-Z a-z 0-9 _ . -")
    env = table.get("env", {})
    if not isinstance(env, dict) or ("env" in table and not env):
        problems.append(f"{key}.env: must be a non-empty table, env = {{ VAR = \"@ref\" }}")
        env = {}
    return Profile(name, str(consumer), tuple(
        (var, ref) for var, value in env.items()
        if (ref := _env_entry(f"{key}.env.{var}", var, value, problems)) is not None))


def _env_entry(key: str, var: str, value: object, problems: list[str]) -> str | None:
    """The ref one variable names, or None after recording why it cannot be used."""
    if not ENV_NAME_RE.fullmatch(var):
        problems.append(f"{key}: not a variable name (letters, digits and _, not first a digit)")
    elif is_loader_var(var):
        problems.append(f"{key}: {var} cannot be set from a profile ({LOADER_REASON})")
    elif not isinstance(value, str):
        problems.append(f"{key}: must be a string naming a secret ref, \"@ref\"")
    else:
        try:
            return parse_ref(value)
        except UsageError:
            problems.append(f"{key}: must be a secret ref like \"@openai_api_key\" "
                            "(the value is not shown)")
    return None


def load_profiles(path: Path) -> dict[str, Profile]:
    """The home's profiles; a missing file holds none."""
    try:
        text = tomlfile.read_text(path)
    except tomlfile.TomlFileError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return {} if text is None else parse_profiles(text, str(path))


def find_profile(profiles: Mapping[str, Profile], name: str, source: Path) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        known = ", ".join(sorted(profiles)) or "none"
        raise NotFound(f"no profile {name!r} in {source} (profiles: {known})",
                       code="profile_not_found") from None


def env_denials(profile: Profile, grants: Sequence[Grant]) -> dict[str, str]:
    """ref -> why no grant gives it to the profile's consumer as `env`; empty when all may."""
    denials: dict[str, str] = {}
    for ref in profile.refs:
        decision = decide(grants, AccessRequest(profile.consumer, ref, None, "env", None))
        if isinstance(decision, Deny):
            denials[ref] = decision.reason
    return denials


def denied(profile: Profile, denials: Mapping[str, str], grants_file: Path) -> Denied:
    """The refusal, with the grants to add, ready to paste."""
    lacking = "; ".join(f"@{ref} ({reason})" for ref, reason in denials.items())
    snippets = "\n".join(grant_snippet(ref, profile.consumer) for ref in denials)
    return Denied(
        f"profile {profile.name!r} was not launched: consumer {profile.consumer!r} has no "
        f"grant with delivery \"env\" for {lacking}.\n"
        f"To allow it, add to {grants_file}:\n\n{snippets}"
    )


def grant_snippet(ref: str, consumer: str) -> str:
    """A valid `[[grants]]` table giving `ref` to `consumer` as env, written by tomli-w so
    any name is quoted correctly."""
    import tomli_w

    table = {"secret_ref": ref, "consumer": consumer, "purposes": ["env"], "delivery": ["env"],
             "allowed_hosts": ["localhost"], "ttl_secs": 300}
    return ("# purposes and allowed_hosts are required, but not consulted for delivery env\n"
            + tomli_w.dumps({"grants": [table]}))
