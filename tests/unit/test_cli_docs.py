"""docs/cli.md is what scripts/gen_cli_docs.py makes of today's parser."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts/gen_cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_not_stale() -> None:
    """docs/cli.md equals the generator's output; rerun scripts/gen_cli_docs.py if not."""
    assert (ROOT / "docs/cli.md").read_text(encoding="utf-8") == generator().render(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py")


def test_every_command_and_flag_is_documented() -> None:
    """Each command path gets a section and each visible argument a row, with its help."""
    gen = generator()
    text = gen.render()

    def walk(parser: argparse.ArgumentParser, prog: str) -> None:
        assert f"## `{prog}`" in text
        for action in gen.visible(parser):
            if not isinstance(action, argparse._HelpAction):
                assert f"| `{gen.spelling(action)}` | {gen.notes(action)} |" in text, action
                assert action.help, f"{prog} {gen.spelling(action)} has no help text"
        for name, _, sub in gen.subcommands(parser):
            walk(sub, f"{prog} {name}")

    walk(gen.build_parser(), "secret-broker")


def test_a_new_flag_makes_the_page_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The staleness check can fail: a flag added to the parser changes the generated page."""
    gen = generator()
    before = gen.render()
    real = gen.build_parser

    def with_new_flag() -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = real()
        gen.subcommands(parser)[0][2].add_argument("--brand-new", action="store_true",
                                                      help="a new flag")
        return parser

    monkeypatch.setattr(gen, "build_parser", with_new_flag)
    after = gen.render()
    assert "| `--brand-new` | a new flag |" in after and after != before
