"""The README's quick start, run as written, gets an answer through the real OpenAI SDK.

The blocks run are the README's own text, found by the `<!-- quickstart -->` comment before
each: the shell blocks with bash (`-euo pipefail`), the Python block with this interpreter.
What differs from a user's machine, and nothing else:

- the home: HOME is a fresh temp directory, so `~/.secret-broker` and `Path.home()` land
  there; the box is headless (no D-Bus session, no terminal), as the README's first block
  describes, so `init` picks the file vault with a generated key file;
- `secret-broker` on PATH runs this checkout (`python -m broker`); the install block before
  the quick start is not run (the test environment already has the package and openai);
- the key: `$OPENAI_API_KEY` holds the key the stand-in expects;
- the port: after `init`, config.toml's `listen` is set to port 0 (a free port, never
  18443), and `127.0.0.1:18443` in the Python block becomes the port the daemon bound;
- the upstream: after `init`, config.toml gets `[providers.openai] base_url` pointing at
  the local stand-in OpenAI server (as tests/support/gateway.py does), and the grant's
  `allowed_hosts = ["api.openai.com"]` names the stand-in's host:port instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CANARY
from tests.support.standins import StandIn

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- quickstart -->\s*\n```(\w+)\n(.*?)^```", re.M | re.S)
README_LISTEN = "127.0.0.1:18443"
README_HOST = '"api.openai.com"'


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, text) of each README block marked `<!-- quickstart -->`, in order."""
    return BLOCK.findall((ROOT / "README.md").read_text())


def replace_once(text: str, old: str, new: str) -> str:
    """`text` with its one `old` replaced: a README that no longer says `old` fails here,
    instead of the test silently running something else."""
    assert text.count(old) == 1, f"expected {old!r} once in the README block:\n{text}"
    return text.replace(old, new)


@pytest.fixture
def upstream() -> Iterator[StandIn]:
    stand = StandIn("openai", f"{CANARY}-openai").start()
    yield stand
    stand.stop()


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A fresh HOME with a `secret-broker` on its PATH that runs this checkout."""
    root = Path(tempfile.mkdtemp(prefix="sb-qs-", dir="/tmp"))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "secret-broker"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m broker "$@"\n')
    shim.chmod(stat.S_IRWXU)
    (root / "home").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_quickstart_as_written(user_home: Path, upstream: StandIn) -> None:
    """The README's quick start, run as written on a headless box, gets the stand-in
    OpenAI's answer through the real OpenAI SDK, and the upstream saw only the real key."""
    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks] == ["sh", "sh", "python"], blocks
    (_, init), (_, setup), (_, sdk) = blocks
    home = user_home / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SECRET_BROKER_")
           and k not in ("CREDENTIALS_DIRECTORY", "DBUS_SESSION_BUS_ADDRESS")}
    env |= {"HOME": str(home), "PATH": f"{user_home / 'bin'}:{env['PATH']}",
            "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": upstream.expected_key}
    outputs: list[str] = []

    def run(argv: list[str]) -> str:
        proc = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        outputs.extend([proc.stdout, proc.stderr])
        assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    try:
        run(["bash", "-euo", "pipefail", "-c", init])
        config = home / ".secret-broker" / "config.toml"
        assert 'backend = "file-vault"' in config.read_text()  # headless: no keychain
        listen = replace_once(config.read_text(), f'listen = "{README_LISTEN}"',
                              'listen = "127.0.0.1:0"')
        config.write_text(f'{listen}\n[providers.openai]\nbase_url = "{upstream.base_url}"\n')
        run(["bash", "-euo", "pipefail", "-c",
             replace_once(setup, README_HOST, f'"{upstream.host}"')])
        status = json.loads(run(["secret-broker", "status", "--json"]))
        port = status["listen"].rsplit(":", 1)[1]
        script = home / "quickstart.py"
        script.write_text(replace_once(sdk, README_LISTEN, f"127.0.0.1:{port}"))
        answer = run([sys.executable, str(script)])
    finally:
        subprocess.run(["secret-broker", "stop"], env=env, capture_output=True, timeout=60,
                       check=False)
    assert answer == upstream.expected_text + "\n"
    token = (home / ".secret-broker" / "broker.token").read_text().strip()
    assert len(upstream.requests) == 1
    sent = json.dumps(upstream.requests[0].headers)
    assert f"Bearer {upstream.expected_key}" in sent and token not in sent
    assert not [text for text in outputs if upstream.expected_key in text]
