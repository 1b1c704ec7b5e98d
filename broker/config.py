"""The home directory's layout, `config.toml`, and the file modes that protect them."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.core.errors import ConfigError, InsecureFile, NotInitialized

DEFAULT_LISTEN = "127.0.0.1:18443"
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int | None:
    """`90s`, `30m`, `12h`, `7d` -> seconds; None when `text` is not a duration."""
    m = _DURATION.fullmatch(text.strip())
    return None if m is None else int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Home:
    """Every path the broker uses, derived from one root."""

    root: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Home:
        env = os.environ if environ is None else environ
        raw = env.get("SECRET_BROKER_HOME") or "~/.secret-broker"
        return cls(Path(raw).expanduser().absolute())

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def grants(self) -> Path:
        return self.root / "secrets.grants.toml"

    @property
    def profiles(self) -> Path:
        return self.root / "profiles.toml"

    @property
    def token(self) -> Path:
        return self.root / "broker.token"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.db"

    @property
    def vault(self) -> Path:
        return self.root / "vault"

    @property
    def vault_key(self) -> Path:
        return self.root / "vault.key"

    @property
    def audit(self) -> Path:
        return self.root / "audit.log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.root / "run/broker.sock"

    @property
    def pid(self) -> Path:
        return self.root / "run/broker.pid"

    @property
    def log(self) -> Path:
        return self.root / "run/broker.log"

    def require(self) -> None:
        if not self.config.exists():
            raise NotInitialized(
                f"no secret-broker home at {self.root}; run `secret-broker init` "
                "(or set SECRET_BROKER_HOME)"
            )


def check_private(path: Path) -> None:
    """Refuse a secret-bearing file or directory that group or others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        fix = "700" if stat.S_ISDIR(mode) else "600"
        raise InsecureFile(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
            f"fix it with: chmod {fix} {path}"
        )


def private_dir(path: Path) -> None:
    """Create `path` (0700) if missing; refuse it unless it is a real directory of ours that
    no one else can enter, since the files in it are then opened by name."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise InsecureFile(f"{path} is not a directory (a symbolic link or a file); remove it "
                           f"(rm {path}) and it is created again")
    if st.st_uid != os.geteuid():
        raise InsecureFile(f"{path} belongs to another user (uid {st.st_uid}); remove it "
                           f"(rm -r {path}) and it is created again")
    check_private(path)


def open_private(path: Path, flags: int) -> int:
    """`os.open` (mode 0600 if created) that never follows a symlink and returns only a
    regular file of ours: a link or a device planted there is refused by name."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise InsecureFile(f"{path} is a symbolic link; remove it (rm {path})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise InsecureFile(f"{path} is not a regular file of this user; remove it (rm {path})")
    return fd


# Files named by the environment that hold a passphrase, key or token: kept private like
# the home's own files (`check` reports them; `check --fix` leaves files outside the home).
SECRET_FILE_VARS = ("SECRET_BROKER_PASSPHRASE_FILE", "SECRET_BROKER_EXPORT_PASSPHRASE_FILE",
                    "SECRET_BROKER_KEY_FILE", "SECRET_BROKER_TOKEN_FILE")


def secret_file_from(env: Mapping[str, str], name: str) -> Path | None:
    """The file environment variable `name` points at, refused when group or others can
    use it; None when the variable is unset or empty."""
    value = env.get(name)
    if not value:
        return None
    path = Path(value)
    try:
        check_private(path)
    except InsecureFile as exc:
        raise InsecureFile(f"{name}: {exc.message}") from None
    return path


def without_broker_vars(environ: Mapping[str, str], keep: tuple[str, ...] = ()
                        ) -> dict[str, str]:
    """`environ` less every SECRET_BROKER_* variable and CREDENTIALS_DIRECTORY but `keep`:
    a child started by the broker gets none of the owner's tokens, passphrases or keys."""
    return {k: v for k, v in environ.items() if k in keep or not (
        k.startswith("SECRET_BROKER_") or k == "CREDENTIALS_DIRECTORY")}


def write_private(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Create or replace a file atomically with mode 0600 (temp, fsync, rename, dir fsync).

    The temp file beside `path`, `.NAME.tmp-RANDOM`, is made by mkstemp (O_CREAT|O_EXCL|
    O_NOFOLLOW, 0600) and checked once open: a name planted in advance (a symlink, a file
    someone holds open) can never receive the data. With replace=False an existing file is kept and
    FileExistsError raised, even one that appeared after the caller looked: the temp file
    is linked into place, never renamed.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            _check_fresh(f.fileno(), tmp)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        (os.replace if replace else os.link)(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not replace:
        tmp.unlink()
    fsync_dir(path.parent)


def _check_fresh(fd: int, path: Path) -> None:
    """The file just created is ours alone: regular, our owner, one link, no group/other bits."""
    st = os.fstat(fd)
    if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1
            or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
        raise InsecureFile(f"the temp file {path} is not the private file just created; "
                           f"check who else writes to {path.parent}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- config.toml -----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    backend: str = "keychain"
    listen: str = DEFAULT_LISTEN
    default_consumer: str = "default"
    max_body_bytes: int = 32 * 1024 * 1024
    connect_timeout_secs: float = 10
    read_timeout_secs: float = 300
    header_timeout_secs: float = 30  # for a request's headers, and for idling between requests
    audit_fsync: str = "batch"
    rotate_after_days: int = 90  # `check` warns about secrets older than this
    providers: dict[str, Any] = field(default_factory=dict)  # raw tables; see providers.py


# section -> key -> (accepted types, Config field name); one table owns the schema.
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "store": {"backend": ((str,), "backend")},
    "broker": {
        "listen": ((str,), "listen"),
        "default_consumer": ((str,), "default_consumer"),
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
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    values: dict[str, Any] = {}
    providers: dict[str, Any] = {}
    for section, body in doc.items():
        if section == "providers":
            providers = _parse_providers(body, source)
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
            if name in _CHOICES and value not in _CHOICES[name]:
                raise ConfigError(
                    f"{source}: [{section}] {key} must be one of {', '.join(_CHOICES[name])}"
                )
            if isinstance(value, int | float) and value <= 0:
                raise ConfigError(f"{source}: [{section}] {key} must be positive")
            values[name] = value
    return Config(**values, providers=providers)


def _parse_providers(body: Any, source: str) -> dict[str, Any]:
    from broker.gateway.providers import build_providers  # the provider table owns that schema

    if not isinstance(body, dict):
        raise ConfigError(f"{source}: [providers] must hold tables like [providers.openai]")
    build_providers(body)  # validate now, naming the key, rather than at first use
    return body


def load_config(home: Home) -> Config:
    home.require()
    try:
        text = home.config.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {home.config}: {exc.strerror}") from None
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
