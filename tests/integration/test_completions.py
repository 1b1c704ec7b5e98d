"""Shell completion: the bash script sourced in a real bash completes commands, flags and refs
(from metadata only, with the store locked); every script is generated from the parser."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.cli.main import build_parser
from tests.conftest import CANARY, Cli

BIN = Path(sys.executable).parent  # where `secret-broker` is installed beside this Python
# Sourced in a non-interactive bash: the completion function reads COMP_LINE and COMP_POINT
# (COMP_WORDS and COMP_CWORD are set as bash would, for completeness).
DRIVE = """
source "$1"
COMP_LINE="$2"
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
[[ $COMP_LINE == *" " ]] && COMP_CWORD=${#COMP_WORDS[@]}
if [ -n "$3" ]; then COMP_WORDBREAKS="$3"; fi
_secret_broker
printf '%s\\n' "${COMPREPLY[@]}"
"""


def top_level_commands() -> list[str]:
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.fixture
def complete(cli: Cli) -> Callable[..., list[str]]:
    """complete(line, wordbreaks="") -> COMPREPLY, from the script `completions bash` prints."""
    assert (BIN / "secret-broker").exists(), "install the package: pip install -e ."
    script = cli.home.parent / "secret-broker.bash"
    script.write_text(cli.ok("completions", "bash"))
    env = {**cli.env, "PATH": f"{BIN}{os.pathsep}{cli.env['PATH']}"}

    def run(line: str, wordbreaks: str = "") -> list[str]:
        proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", DRIVE, "drive",
                               str(script), line, wordbreaks], capture_output=True, text=True,
                              env=env, stdin=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        cli.outputs += [proc.stdout]
        return [w for w in proc.stdout.split("\n") if w]

    return run


def test_bash_completes_commands_flags_and_refs(cli: Cli,
                                               complete: Callable[..., list[str]]) -> None:
    """A command from a prefix, a flag, a choice, and refs, with and without "@" breaking
    words; no value appears anywhere."""
    run = complete
    cli.add("@openai_api_key", CANARY)
    cli.add("@jina_api_key", CANARY + "-jina", provider="jina")
    assert run("secret-broker ins") == ["inspect"]
    assert run("secret-broker ") == top_level_commands()
    assert run("secret-broker grants ex") == ["explain"]
    assert run("secret-broker inspect --j") == ["--json"]
    assert run("secret-broker init --backend ") == ["keychain", "file-vault"]
    assert run("secret-broker inspect ") == ["@jina_api_key", "@openai_api_key"]
    # readline splits at "@" by default, so only what follows it is completed
    assert run("secret-broker rotate @op") == ["openai_api_key"]
    assert run("secret-broker rotate @op", wordbreaks=" \t\n\"'><=;|&(:") == [
        "@openai_api_key"]
    assert run("secret-broker grants explain --secret @j") == ["jina_api_key"]
    assert CANARY not in "\n".join(cli.outputs)


def test_refs_complete_while_the_store_is_locked(cli: Cli,
                                                 complete: Callable[..., list[str]]) -> None:
    """With the vault's key file gone (the store cannot unlock), refs still complete."""
    run = complete
    cli.add("@openai_api_key", CANARY)
    (cli.home / "vault.key").rename(cli.home.parent / "vault.key.away")
    assert cli("exec", "--env", "V=@openai_api_key", "--", "true").returncode == 5
    assert run("secret-broker remove ") == ["@openai_api_key"]
    assert cli.ok("list", "--refs") == "openai_api_key\n"


def command_paths(parser: argparse.ArgumentParser, path: str = ""
                  ) -> Iterator[tuple[str, list[str]]]:
    """Every command path of the parser with its visible option strings, depth first."""
    options: list[str] = []
    subs: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subs.update(action.choices)
        elif action.help != argparse.SUPPRESS:
            options += action.option_strings
    yield path, options
    for name, sub in subs.items():
        yield from command_paths(sub, f"{path} {name}".lstrip())


def spelled(shell: str, option: str) -> str:
    """An option as the shell's script names it (fish: `-l json`, `-s h`)."""
    if shell != "fish":
        return option
    return f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_every_script_is_generated_from_the_parser(cli: Cli, shell: str) -> None:
    """Each script holds every command path and option `build_parser()` defines, and
    leaves out the hidden `list --refs`."""
    script = cli.ok("completions", shell)
    nodes = dict(command_paths(build_parser()))
    assert {"export", "import", "check", "grants explain", "token revoke"} <= set(nodes)
    for path, options in nodes.items():
        for word in [*path.split()[-1:], *(spelled(shell, option) for option in options)]:
            assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", script), (path, word)
    assert "list --refs 2>/dev/null" in script  # how refs are fetched: metadata only
    assert "--refs" not in script.replace("list --refs 2>/dev/null", "")  # never offered


def test_exec_and_list_import_only_what_a_key_file_vault_needs(cli: Cli) -> None:
    """The commands a script runs most stay light: shtab is the completions command's alone,
    aiohttp the server's, and Argon2 a passphrase vault's (a cold start, as from a shell)."""
    cli.add("@k", CANARY)
    for args in (["exec", "--env", "K=@k", "--", "true"], ["list"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "broker", *args],
                              env=cli.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "broker.cli.main" in imported  # the probe sees the CLI's imports
        assert not {"shtab", "aiohttp", "keyring", "argon2"} & imported, args
    assert "shtab" in subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "broker", "completions", "bash"],
        env=cli.env, capture_output=True, text=True, timeout=60).stderr
