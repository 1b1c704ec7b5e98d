"""What every command shares: the opened home, reading a value, printing tables and JSON."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.core.errors import UsageError
from broker.core.home import Home
from broker.core.text import printable

if TYPE_CHECKING:
    from broker.service.context import Context

EXIT_CODES = """\
exit codes: 0 ok, 1 error, 2 usage, 3 secret not found, 4 denied,
            5 unlock or decrypt failure, 6 broker not running"""
JSON = "print JSON instead of a table or text"


def context(args: argparse.Namespace) -> Context:
    from broker.service.context import Context

    home = Home.from_env()
    home.require()
    return Context.open(home)


def print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    cells = [list(header)] + [["-" if c is None else printable(str(c)) for c in row]
                              for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def read_value(args: argparse.Namespace, prompt: str) -> str:
    """From stdin with --stdin (one trailing newline stripped), else a hidden TTY prompt."""
    if args.stdin:
        value = sys.stdin.read()
        for newline in ("\r\n", "\n"):
            if value.endswith(newline):
                value = value[: -len(newline)]
                break
        return value
    if not sys.stdin.isatty():
        raise UsageError("no terminal to prompt on; pipe the value in with --stdin")
    return getpass.getpass(prompt)


