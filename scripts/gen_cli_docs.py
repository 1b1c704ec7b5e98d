#!/usr/bin/env python3
"""Write docs/cli.md from the CLI's own parser, so the reference cannot drift from the code.

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale

Usage lines are built here rather than by argparse's formatter, whose wrapping depends on
the terminal width and the Python version.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.cli.main import EXIT_CODES, build_parser  # noqa: E402

OUT = ROOT / "docs" / "cli.md"

# When each exit code happens; the codes themselves come from the parser's epilog.
EXAMPLES = {
    0: "the command did what it was asked (`grants explain`: the grant allows it)",
    1: "an error: an invalid file, a file others can read, a clash, the audit log unwritable, "
       "git refusing (a dirty checkout, a non-fast-forward, a rejected push)",
    2: "bad usage: an unknown flag, a malformed ref, a template typo, a value over 64 KiB",
    3: "a secret, token, profile or team that does not exist",
    4: "denied by the grants (or their absence), a wrong token, a budget spent",
    5: "the store does not unlock, a value does not decrypt, or a team's commit fails "
       "verification (tampering, rollback)",
    6: "the broker is not running (or its port is not yours)",
}


def exit_codes() -> dict[int, str]:
    """{code: meaning}, parsed from the epilog every --help prints."""
    text = " ".join(EXIT_CODES.split(":", 1)[1].split())
    codes = {int(m[1]): m[2] for m in re.finditer(r"(\d+) ([^,]+)", text)}
    if codes.keys() != EXAMPLES.keys():
        raise SystemExit(f"exit codes {sorted(codes)} differ from EXAMPLES in {__file__}")
    return codes


def visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]


def metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def spelling(action: argparse.Action) -> str:
    """How the argument is written: `--to AGE_RECIPIENT`, `-i/--input TEMPLATE`, `ref`."""
    if not action.option_strings:
        name = metavar(action)
        return f"[{name}]" if action.nargs == "?" else name
    flags = "/".join(action.option_strings)
    return flags if action.nargs == 0 else f"{flags} {metavar(action)}"


def word(action: argparse.Action) -> str:
    """One argument in a usage line: the long flag and its metavar, or the positional."""
    if not action.option_strings:
        return spelling(action)
    flag = action.option_strings[-1]
    return flag if action.nargs == 0 else f"{flag} {metavar(action)}"


def usage(prog: str, parser: argparse.ArgumentParser) -> str:
    """`prog [--a A] (--b B | --c) ref`: optionals first, then positionals, as argparse does."""
    grouped = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    words, seen = [prog], set()
    actions = [a for a in visible(parser) if not isinstance(a, argparse._HelpAction)]
    for action in sorted(actions, key=lambda a: not a.option_strings):
        group = grouped.get(id(action))
        if group is None:
            optional = bool(action.option_strings) and not action.required
            words.append(f"[{word(action)}]" if optional else word(action))
        elif id(group) not in seen:
            seen.add(id(group))
            inner = " | ".join(word(a) for a in group._group_actions)
            words.append(f"({inner})" if group.required else f"[{inner}]")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            words.append(f"{action.metavar or metavar(action)} ...")
    return " ".join(words)


def subcommands(parser: argparse.ArgumentParser
                ) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order --help lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps[name], p) for name, p in action.choices.items()]
    return []


def notes(action: argparse.Action) -> str:
    parts = [action.help or ""] if action.help else []
    if action.required and action.option_strings:
        parts.append("required")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or ""):
        parts.append("repeatable")
    if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
        parts.append(f"default: `{action.default}`")
    return "; ".join(parts).replace("|", "\\|")


def section(prog: str, help_: str, parser: argparse.ArgumentParser) -> Iterator[str]:
    yield f"## `{prog}`"
    yield ""
    yield help_[0].upper() + help_[1:] + ("" if help_.endswith(".") else ".")
    yield ""
    yield "```text"
    yield usage(prog, parser)
    yield "```"
    yield ""
    rows = [a for a in visible(parser) if not isinstance(a, argparse._HelpAction)]
    if rows:
        yield "| argument | description |"
        yield "|---|---|"
        for action in rows:
            yield f"| `{spelling(action)}` | {notes(action)} |"
        yield ""
    for name, sub_help, sub in subcommands(parser):
        yield from section(f"{prog} {name}", sub_help, sub)


def render() -> str:
    parser = build_parser()
    lines = [
        "# Command line reference",
        "",
        "<!-- Generated by scripts/gen_cli_docs.py from the CLI's parser: do not edit by hand;",
        "     run `python scripts/gen_cli_docs.py` after changing a command or flag. -->",
        "",
        f"{parser.description} Every command takes `-h`/`--help`;",
        "`secret-broker --version` prints the version.",
        "",
        "## Exit codes",
        "",
        "Every command exits with one of these codes (`main()` maps the broker's errors to",
        "them), so a script can tell the cases apart without reading the message.",
        "",
        "| code | meaning | for example |",
        "|---|---|---|",
        *(f"| {code} | {meaning} | {EXAMPLES[code]} |" for code, meaning in exit_codes().items()),
        "",
        "An interrupted command (Ctrl-C) exits 130 and says that nothing more was changed.",
        "",
        "## Commands",
        "",
        "| command | does |",
        "|---|---|",
    ]
    for name, help_, _ in subcommands(parser):
        lines.append(f"| [`{name}`](#secret-broker-{name}) | {help_.replace('|', chr(92) + '|')} |")
    lines.append("")
    lines.extend(section("secret-broker", "the options every command line may start with",
                         parser))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if sys.argv[1:] == ["--check"]:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
