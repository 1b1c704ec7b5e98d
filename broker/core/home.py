"""The home directory's layout, and the file modes and private-file writes that protect it."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.core.errors import InsecureFile, NotInitialized


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


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or edited (inode, size, mtime), or None when it
    is missing: a stat per check, so a daemon notices an edit without reading the file."""
    try:
        st = os.stat(path)  # not Path.stat: this runs before every decision
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
