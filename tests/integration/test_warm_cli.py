"""The test harness's warm CLI answers exactly as a cold `python -m broker` does."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import CANARY, Cli
from tests.support import warm_cli


def cold(cli: Cli, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return warm_cli.cold(args, input=input, env=cli.env, timeout=60)


def warm(cli: Cli, *args: str, input: str | None = None, **env: str
         ) -> subprocess.CompletedProcess[str]:
    return warm_cli.run(args, input=input, env={**cli.env, **env}, timeout=60)


def test_warm_and_cold_calls_agree_on_codes_streams_input_and_environment(
        cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit code, stdout and stderr match for a success, a refusal and a usage error; input
    and the working directory reach the command; each call sees only its own environment."""
    monkeypatch.chdir(cli.home.parent)
    add = ("add", "@k", "--provider", "openai", "--kind", "api_key", "--stdin")
    assert warm(cli, *add, input=CANARY).returncode == 0
    calls: list[tuple[tuple[str, ...], str | None]] = [
        (("list", "--json"), None),
        (add, CANARY),                                     # exists: refused
        (("inspect", "@k"), None),
        (("inspect", "@no/such"), None),                   # usage error
        (("exec", "--env", "V=@k", "--", "sh", "-c", 'test "$V" = "$1" && pwd', "-", CANARY),
         None),
    ]
    for args, input in calls:
        a, b = warm(cli, *args, input=input), cold(cli, *args, input=input)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
    assert [warm(cli, *add, input=CANARY).returncode, warm(cli, "inspect", "@no/such").returncode
            ] == [1, 2]
    other = cli.home.parent / "other"
    assert "no secret-broker home" in warm(cli, "list", SECRET_BROKER_HOME=str(other)).stderr
    assert warm(cli, "list").returncode == 0  # the next call has its own environment again
