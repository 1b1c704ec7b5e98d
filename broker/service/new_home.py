"""A new home (`init`): its folders, keys, instance id and example files, created once.

An existing home is never re-created, even half of one: new keys would make its stored
secrets and its audit chain unreadable.
"""

from __future__ import annotations

import base64
import os
import secrets
import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.config import load_config, render_config
from broker.core.errors import BrokerError, UsageError
from broker.core.home import Home, write_private
from broker.service.context import INSTANCE_KEY, Context
from broker.service.tokens import new_token
from broker.store.backend import choose_backend
from broker.store.metadata import Metadata

EXAMPLE_GRANTS = """\
# secrets.grants.toml: who may use which secret, for what, where. Deny by default:
# a request is allowed only when one grant matches its secret, consumer, purpose,
# delivery and upstream host. Every grant below is commented out, so nothing is allowed.
# Check your edits with `secret-broker grants check`.

# [[grants]]
# secret_ref = "openai_api_key"
# consumer = "ugent-core"
# purposes = ["llm.chat", "llm.embeddings"]
# delivery = ["native", "http_header_inject"]
# allowed_hosts = ["api.openai.com"]
# ttl_secs = 300
"""


@dataclass(frozen=True)
class InitResult:
    home: Home
    backend: str
    why: str
    created: bool
    key_file: bool = False


def init_home(home: Home, requested: str | None, environ: Mapping[str, str] | None = None
              ) -> InitResult:
    """Create the home; on an existing home, change nothing and say so.

    A home whose config.toml is missing is refused, not re-created: new keys and a new
    instance id would make every stored secret and the audit chain unreadable.
    """
    if home.config.exists():
        config = load_config(home)
        if requested is not None and requested != config.backend:
            raise BrokerError(
                f"{home.root} already exists with the {config.backend} store; init does not "
                f"change it to {requested} (nothing was changed). To move the secrets: "
                f"`secret-broker export`, init a new home with --backend {requested}, then "
                "`secret-broker import`")
        return InitResult(home, config.backend, "this home already exists; nothing was changed",
                          created=False)
    if home.root.exists() and not home.root.is_dir():
        raise UsageError(f"{home.root} is not a directory; point SECRET_BROKER_HOME at a "
                         "directory (it is created if missing)")
    found = _home_leftovers(home)
    if found:
        backend = "file-vault" if any(f.startswith("vault") for f in found) else "keychain"
        raise BrokerError(
            f"{home.root} holds an existing secret-broker home ({', '.join(found)}) but no "
            "config.toml; init changed nothing, since new keys would make its secrets "
            f"unreadable. Restore config.toml from a backup, or write one holding [store] "
            f'backend = "{backend}", then run `secret-broker check`; to start afresh, move '
            f"{home.root} away first", code="home_exists")
    choice = choose_backend(requested, environ)
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    home.run.mkdir(mode=0o700, exist_ok=True)
    key_file = False
    if choice.backend == "file-vault":
        from broker.store.vault import create_vault

        key_file = create_vault(home, choice.passphrase) == "keyfile"
    metadata = Metadata(home.metadata)
    metadata.set_meta("instance_id", uuid.uuid4().hex)
    metadata.close()
    write_private(home.token, (new_token() + "\n").encode())
    write_private(home.grants, EXAMPLE_GRANTS.encode())
    ctx = Context.open(home, environ)
    try:
        ctx.store.put(INSTANCE_KEY, base64.b64encode(secrets.token_bytes(32)).decode(), 1)
        # config.toml last: its presence is what marks the home as initialised.
        write_private(home.config, render_config(choice.backend).encode())
        ctx.record("broker.initialized", backend=choice.backend)
    finally:
        ctx.session.close()
    return InitResult(home, choice.backend, choice.why, created=True, key_file=key_file)


def _home_leftovers(home: Home) -> list[str]:
    """What an earlier home left that init would overwrite (paths relative to the root)."""
    vault = sorted(p for p in home.vault.glob("*") if p.name == "header.json"
                   or p.suffix == ".sbv")
    files = [*vault, home.vault_key, home.token, home.audit, home.grants]
    found = [str(p.relative_to(home.root)) for p in files if os.path.lexists(p)]
    if _holds_rows(home.metadata):
        found.append(home.metadata.name)
    return found


def _holds_rows(path: Path) -> bool:
    """Whether a metadata DB records anything (opening one only writes `generation`).

    Read as immutable, so no -shm or -wal file is left behind; a write-ahead log not yet
    folded in, or a file that cannot be read, counts as rows: neither is init's to replace.
    """
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return True
    if not path.exists() or path.stat().st_size == 0:
        return False
    try:
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            tables = [row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            return any(db.execute(f'SELECT 1 FROM "{table}"'  # noqa: S608 - names from the DB
                                  + (" WHERE key != 'generation'" if table == "meta" else "")
                                  + " LIMIT 1").fetchone() for table in tables)
        finally:
            db.close()
    except sqlite3.Error:
        return True
