"""`config.toml`: the settings (Config), parsed strictly, loaded from a home, rendered by `init`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from broker.core.errors import ConfigError
from broker.core.home import Home
from broker.core.refs import REF_RE, TEAM_NAME_RE
from grants import tomlfile

DEFAULT_LISTEN = "127.0.0.1:18443"


@dataclass(frozen=True)
class Config:
    backend: str = "keychain"
    listen: str = DEFAULT_LISTEN
    default_consumer: str = "default"
    workers: int | str = 1  # worker processes: a number, or "auto" (one per core)
    max_body_bytes: int = 32 * 1024 * 1024
    connect_timeout_secs: float = 10
    read_timeout_secs: float = 300
    header_timeout_secs: float = 30  # for a request's headers, and for idling between requests
    audit_fsync: str = "batch"
    rotate_after_days: int = 90  # `check` warns about secrets older than this
    providers: dict[str, Any] = field(default_factory=dict)  # raw tables; see providers.py
    teams: dict[str, TeamConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class TeamConfig:
    """`[teams.NAME]`: a team vault's git work tree, and how its refs are served."""
    name: str
    path: str
    ref: str = "HEAD"  # e.g. "refs/remotes/origin/main": only what was pushed
    prefix: str = ""  # refs are served as prefix + ref; "" means NAME + "."
    max_stale_hours: int = 168  # `check` warns when the served commit is older

    @property
    def ref_prefix(self) -> str:
        return self.prefix or f"{self.name}."


_TEAM_KEYS: dict[str, type] = {"path": str, "ref": str, "prefix": str, "max_stale_hours": int}


# section -> key -> (accepted types, Config field name); one table owns the schema.
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "store": {"backend": ((str,), "backend")},
    "broker": {
        "listen": ((str,), "listen"),
        "default_consumer": ((str,), "default_consumer"),
        "workers": ((int, str), "workers"),
    },
    "limits": {
        "max_body_bytes": ((int,), "max_body_bytes"),
        "connect_timeout_secs": ((int, float), "connect_timeout_secs"),
        "read_timeout_secs": ((int, float), "read_timeout_secs"),
        "header_timeout_secs": ((int, float), "header_timeout_secs"),
    },
    "audit": {"fsync": ((str,), "audit_fsync")},
    "check": {"rotate_after_days": ((int,), "rotate_after_days")},
}
_CHOICES = {"backend": ("keychain", "file-vault"), "audit_fsync": ("always", "batch")}


def parse_config(text: str, source: str = "config.toml") -> Config:
    """Strict: an unknown key or a wrong type is an error naming it, never ignored."""
    try:
        doc = tomlfile.parse(text)
    except tomlfile.TomlFileError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    values: dict[str, Any] = {}
    providers: dict[str, Any] = {}
    teams: dict[str, TeamConfig] = {}
    for section, body in doc.items():
        if section == "providers":
            providers = _parse_providers(body, source)
            continue
        if section == "teams":
            teams = _parse_teams(body, source)
            continue
        keys = _SCHEMA.get(section)
        if keys is None:
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in body.items():
            if key not in keys:
                raise ConfigError(f"{source}: unknown key '{key}' in [{section}]")
            types, name = keys[key]
            if isinstance(value, bool) or not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{source}: [{section}] {key} must be {want}")
            if name == "workers" and isinstance(value, str) and value != "auto":
                raise ConfigError(f"{source}: [{section}] {key} must be a number or \"auto\"")
            if name in _CHOICES and value not in _CHOICES[name]:
                raise ConfigError(
                    f"{source}: [{section}] {key} must be one of {', '.join(_CHOICES[name])}"
                )
            if isinstance(value, int | float) and value <= 0:
                raise ConfigError(f"{source}: [{section}] {key} must be positive")
            values[name] = value
    return Config(**values, providers=providers, teams=teams)


def _parse_teams(body: Any, source: str) -> dict[str, TeamConfig]:
    if not isinstance(body, dict) or not all(isinstance(t, dict) for t in body.values()):
        raise ConfigError(f"{source}: [teams] must hold tables like [teams.acme]")
    teams = {}
    for name, table in body.items():
        for key, value in table.items():
            want = _TEAM_KEYS.get(key)
            if want is None:
                raise ConfigError(f"{source}: unknown key '{key}' in [teams.{name}]; known: "
                                  f"{', '.join(_TEAM_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, want):
                raise ConfigError(f"{source}: [teams.{name}] {key} must be {want.__name__}")
        if "path" not in table:
            raise ConfigError(f"{source}: [teams.{name}] needs path (the git work tree)")
        if not TEAM_NAME_RE.fullmatch(name):
            raise ConfigError(f"{source}: [teams.{name}]: a team name is 1-64 of a-z 0-9 _ . -")
        if "prefix" in table and not REF_RE.fullmatch(table["prefix"] + "x"):
            raise ConfigError(f"{source}: [teams.{name}] prefix must be A-Z a-z 0-9 _ . - "
                              "(it starts every served ref)")
        if table.get("max_stale_hours", 1) <= 0:
            raise ConfigError(f"{source}: [teams.{name}] max_stale_hours must be positive")
        teams[name] = TeamConfig(name, **table)
    return teams


def _parse_providers(body: Any, source: str) -> dict[str, Any]:
    from broker.gateway.providers import build_providers  # the provider table owns that schema

    if not isinstance(body, dict):
        raise ConfigError(f"{source}: [providers] must hold tables like [providers.openai]")
    build_providers(body)  # validate now, naming the key, rather than at first use
    return body


def load_config(home: Home) -> Config:
    home.require()
    try:
        text = tomlfile.read_text(home.config)
    except tomlfile.TomlFileError as exc:
        raise ConfigError(f"{home.config}: {exc}") from None
    if text is None:  # removed since require() looked
        raise ConfigError(f"{home.config}: no such file; run `secret-broker init`")
    return parse_config(text, str(home.config))


def render_config(backend: str) -> str:
    """The commented config.toml that `init` writes."""
    return f"""\
# secret-broker settings. Every key is optional; the values shown are the defaults.
# An unknown key or a wrong type is an error, so a typo never goes unnoticed.

[store]
backend = "{backend}"            # "keychain" or "file-vault"; chosen at init

[broker]
listen = "{DEFAULT_LISTEN}"      # loopback HTTP; `serve --listen HOST:PORT` overrides
default_consumer = "default"     # consumer used when a request names none
workers = 1                      # processes serving requests: a number, or "auto" (one per
                                 # core); `serve --workers N` overrides

[limits]
max_body_bytes = 33554432
connect_timeout_secs = 10
read_timeout_secs = 300          # idle read timeout on upstream streams
header_timeout_secs = 30         # a client's time to send a request's headers (and to idle
                                 # between requests) before its connection is closed

[audit]
fsync = "batch"                  # "always": fsync every event; "batch": at most 100 ms late

# Upstreams may be redirected, e.g. to a local gateway (a path prefix is kept):
# [providers.openai]
# base_url = "https://api.openai.com"
# secret_ref = "openai_api_key"
"""


def worker_count(value: int | str) -> int:
    """`workers` as a number: "auto" is one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if value == "auto" else int(value)
