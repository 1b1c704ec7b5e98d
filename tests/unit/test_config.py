"""broker.config: strict config.toml parsing, the home layout and private file modes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker.config import DEFAULT_LISTEN, Config, parse_config, render_config
from broker.core.errors import ConfigError, InsecureFile, NotInitialized
from broker.core.home import Home, check_private, write_private


def test_empty_config_gives_defaults() -> None:
    """Every key is optional; the defaults are SPEC §2's."""
    config = parse_config("")
    assert config == Config()
    assert (config.backend, config.listen, config.default_consumer) == (
        "keychain", "127.0.0.1:18443", "default")
    assert (config.max_body_bytes, config.connect_timeout_secs, config.read_timeout_secs) == (
        33554432, 10, 300)
    assert config.audit_fsync == "batch"


def test_full_config() -> None:
    """Every documented key is read into its field."""
    config = parse_config("""
[store]
backend = "file-vault"
[broker]
listen = "127.0.0.1:9000"
default_consumer = "ugent-core"
[limits]
max_body_bytes = 1024
connect_timeout_secs = 2.5
read_timeout_secs = 60
[audit]
fsync = "always"
[providers.openai]
base_url = "http://127.0.0.1:9000/openai"
secret_ref = "openai_api_key"
[providers.jina]
secret_ref = "jina_key"
""")
    assert config.backend == "file-vault"
    assert config.listen == "127.0.0.1:9000"
    assert config.default_consumer == "ugent-core"
    assert (config.max_body_bytes, config.connect_timeout_secs, config.read_timeout_secs) == (
        1024, 2.5, 60)
    assert config.audit_fsync == "always"
    assert set(config.providers) == {"openai", "jina"}  # validated; providers.py reads them


@pytest.mark.parametrize("backend", ["keychain", "file-vault"])
def test_rendered_config_parses(backend: str) -> None:
    """The commented file `init` writes is valid and round-trips its backend."""
    assert parse_config(render_config(backend)) == Config(backend=backend, listen=DEFAULT_LISTEN)


@pytest.mark.parametrize(("text", "message"), [
    ('[store]\nbakend = "keychain"\n', "unknown key 'bakend' in \\[store\\]"),
    ("[broker]\nport = 1\n", "unknown key 'port' in \\[broker\\]"),
    ("[limits]\nmax_body = 1\n", "unknown key 'max_body' in \\[limits\\]"),
    ('[audit]\nsync = "always"\n', "unknown key 'sync' in \\[audit\\]"),
    ("[storage]\n", "unknown section \\[storage\\]"),
    ('listen = "x"\n', "unknown section \\[listen\\]"),
    ('[providers.openai]\nurl = "http://x"\n', r"(?=.*\[providers\.openai\])(?=.*\burl\b)"),
    ('[teams.acme]\npath = "/x"\nbranch = "main"\n', "unknown key 'branch' in \\[teams.acme\\]"),
])
def test_unknown_keys_are_named(text: str, message: str) -> None:
    """A typo is an error naming the key and its section, never ignored."""
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


@pytest.mark.parametrize(("text", "message"), [
    ("[store]\nbackend = 1\n", "\\[store\\] backend must be str"),
    ("[broker]\nlisten = 28443\n", "\\[broker\\] listen must be str"),
    ('[limits]\nmax_body_bytes = "32M"\n', "\\[limits\\] max_body_bytes must be int"),
    ("[limits]\nmax_body_bytes = 1.5\n", "\\[limits\\] max_body_bytes must be int"),
    ("[limits]\nmax_body_bytes = true\n", "\\[limits\\] max_body_bytes must be int"),
    ('[limits]\nread_timeout_secs = "5"\n', "read_timeout_secs must be int or float"),
    ("[limits]\nconnect_timeout_secs = false\n", "connect_timeout_secs must be int or float"),
    ("[audit]\nfsync = true\n", "\\[audit\\] fsync must be str"),
    ('[store]\nbackend = "plaintext"\n', "backend must be one of keychain, file-vault"),
    ('[audit]\nfsync = "never"\n', "fsync must be one of always, batch"),
    ("[limits]\nmax_body_bytes = 0\n", "max_body_bytes must be positive"),
    ("[limits]\nread_timeout_secs = -1.0\n", "read_timeout_secs must be positive"),
    ('store = "x"\n', "\\[store\\] must be a table"),
    ('providers = "openai"\n', "\\[providers\\] must hold tables"),
    ('[providers]\nopenai = "x"\n', "\\[providers.openai\\] must be a table"),
    ("[providers.openai]\nbase_url = 5\n", r"\[providers\.openai\] base_url\b"),
    ('[providers.openai]\nsecret_ref = ""\n', r"\[providers\.openai\] secret_ref\b"),
    ('teams = "acme"\n', "\\[teams\\] must hold tables"),
    ('[teams.acme]\nref = "HEAD"\n', "\\[teams.acme\\] needs path"),
    ('[teams.acme]\npath = 1\n', "\\[teams.acme\\] path must be str"),
    ('[teams.acme]\npath = "/x"\nmax_stale_hours = "1"\n', "max_stale_hours must be int"),
    ('[teams.acme]\npath = "/x"\nmax_stale_hours = 0\n', "max_stale_hours must be positive"),
    ('[teams.acme]\npath = "/x"\nprefix = "a b"\n', "\\[teams.acme\\] prefix must be"),
    ('[teams.Acme]\npath = "/x"\n', "a team name is"),
])
def test_wrong_types_are_named(text: str, message: str) -> None:
    """A wrong type or value is an error naming the section and key."""
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_a_team_table() -> None:
    config = parse_config('[teams.acme]\npath = "/src/acme"\nref = "refs/remotes/origin/main"\n')
    team = config.teams["acme"]
    assert (team.path, team.ref, team.ref_prefix, team.max_stale_hours) == (
        "/src/acme", "refs/remotes/origin/main", "acme.", 168)
    assert parse_config('[teams.acme]\npath = "/x"\nprefix = "t-"\n').teams["acme"].ref_prefix \
        == "t-"


def test_syntax_error_names_the_source() -> None:
    """A TOML syntax error is a ConfigError that names the file."""
    with pytest.raises(ConfigError, match=r"^/h/config\.toml: "):
        parse_config("[store\n", "/h/config.toml")


def test_home_layout() -> None:
    """Every path derives from the root, as SPEC §2 lists."""
    h = Home(Path("/x/h"))
    assert {p.name for p in (h.config, h.grants, h.token, h.metadata, h.vault, h.vault_key,
                             h.audit)} == {
        "config.toml", "secrets.grants.toml", "broker.token", "metadata.db", "vault",
        "vault.key", "audit.log"}
    assert (h.socket, h.pid) == (Path("/x/h/run/broker.sock"), Path("/x/h/run/broker.pid"))


def test_home_from_env() -> None:
    """SECRET_BROKER_HOME wins; the default is ~/.secret-broker, made absolute."""
    assert Home.from_env({"SECRET_BROKER_HOME": "/srv/h"}).root == Path("/srv/h")
    assert Home.from_env({}).root == Path("~/.secret-broker").expanduser().absolute()


def test_require_names_init(tmp_path: Path) -> None:
    """A home without config.toml is not initialised, and the error says what to run."""
    with pytest.raises(NotInitialized, match="secret-broker init"):
        Home(tmp_path).require()


def test_write_private_creates_0600_atomically(tmp_path: Path) -> None:
    """write_private replaces a file with mode 0600 and leaves no temp file behind."""
    target = tmp_path / "broker.token"
    target.write_text("old")
    target.chmod(0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["broker.token"]


@pytest.mark.parametrize(("mode", "is_dir", "fix"), [
    (0o640, False, "chmod 600"), (0o604, False, "chmod 600"), (0o710, True, "chmod 700"),
])
def test_check_private_refuses_loose_modes(tmp_path: Path, mode: int, is_dir: bool,
                                           fix: str) -> None:
    """Group or other access is refused with the file and the chmod that fixes it."""
    path = tmp_path / "thing"
    if is_dir:
        path.mkdir()
    else:
        path.write_text("x")
    path.chmod(mode)
    with pytest.raises(InsecureFile, match=f"{path}.*{fix} {path}$"):
        check_private(path)


def test_check_private_accepts_private_and_missing(tmp_path: Path) -> None:
    """0600 files, 0700 directories and missing paths pass."""
    f = tmp_path / "f"
    f.write_text("x")
    f.chmod(0o600)
    tmp_path.chmod(0o700)
    check_private(f)
    check_private(tmp_path)
    check_private(tmp_path / "missing")
