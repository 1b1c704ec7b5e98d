"""Secret references in text: `${{ secrets.NAME }}` and `{{ @ref }}`. Pure.

Two steps, so that nothing is written until every reference is known to resolve: callers
`find_refs()` first, resolve all of them, then `render()` in one pass. A substituted value
is never scanned again, so a value that looks like a template stays exactly as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from grants.model import REF_PATTERN

_NAME = REF_PATTERN  # a secret ref, case-sensitive
# Alternatives are tried in order at each position: a complete reference wins; an opening
# that does not complete one is reported, since a typo must not pass through as text.
_SP = r"[ \t]*"  # spaces inside the braces are optional; a reference never spans lines
_TOKEN = re.compile(
    rf"\$\{{\{{{_SP}secrets\.(?P<secrets>{_NAME}){_SP}\}}\}}"
    rf"|\{{\{{{_SP}@(?P<at>{_NAME}){_SP}\}}\}}"
    rf"|(?P<bad>\$\{{\{{{_SP}secrets\.|\{{\{{{_SP}@)"
)


class TemplateError(ValueError):
    """A reference opens but does not close as one; `line` and `column` are 1-based."""

    def __init__(self, line: int, column: int, opening: str) -> None:
        self.line = line
        self.column = column
        self.reason = (
            f"{opening!r} does not start a valid reference; write "
            "${{ secrets.NAME }} or {{ @NAME }} with NAME 1-128 of A-Z a-z 0-9 _ . -"
        )
        super().__init__(f"line {line}, column {column}: {self.reason}")


def find_refs(text: str) -> list[str]:
    """The names referenced, each once, in order of first use; TemplateError if malformed."""
    found: dict[str, None] = {}
    for m in _TOKEN.finditer(text):
        if m["bad"] is not None:
            # Quote only the opening: the rest of the line may hold a hard-coded secret.
            line_start = text.rfind("\n", 0, m.start()) + 1
            raise TemplateError(text.count("\n", 0, m.start()) + 1, m.start() - line_start + 1,
                                m["bad"])
        found.setdefault(m["secrets"] or m["at"])
    return list(found)


def render(text: str, values: Mapping[str, str]) -> str:
    """Replace every reference by its value, verbatim, in one pass.

    `values` must hold every name `find_refs(text)` returns (a KeyError otherwise): resolving
    is the caller's job, done in full before anything is rendered.
    """
    # find_refs has vetted the text, so every match here is a complete reference.
    return _TOKEN.sub(lambda m: values[m["secrets"] or m["at"]], text)


def ref_template(ref: str) -> str:
    """The template that stands for one ref, so `@ref` settings share the template path."""
    return "{{ @" + ref + " }}"
