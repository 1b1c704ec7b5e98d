"""Every relative link in README.md points at a file of the checkout, and an anchor in it at
a heading of that Markdown file (GitHub's slugs). The docs/ pages are checked by
`mkdocs build --strict`; the README is not part of that site, so it is checked here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The Markdown without its fenced code blocks (a `[x](y)` in code is not a link)."""
    return FENCE.sub("", text)


def slugs(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated slug numbered -1, -2 …"""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(prose(markdown)):
        text = re.sub(r"`|\*\*|__", "", title).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(readme: Path) -> list[str]:
    """Each relative link of `readme` whose file, or anchor in that file, does not exist."""
    broken = []
    for target in LINK.findall(prose(readme.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: … are not checked
            continue
        path_text, _, anchor = target.partition("#")
        path = (readme.parent / path_text).resolve() if path_text else readme
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in slugs(path.read_text()):
            broken.append(f"{target}: no heading with that anchor in {path.name}")
    return broken


def test_readme_links_resolve() -> None:
    """Every relative link and image in README.md reaches a file, and its anchor a heading."""
    assert broken_links(ROOT / "README.md") == []


def test_readme_has_links_to_check() -> None:
    """The check sees the README's links to docs/ (a parser that found none would pass)."""
    links = LINK.findall(prose((ROOT / "README.md").read_text()))
    assert "docs/threat-model.md" in links


def test_broken_file_and_anchor_are_reported(tmp_path: Path) -> None:
    """A link to a missing file and one to a missing heading are both reported; a link in a
    code block and an absolute URL are not checked."""
    (tmp_path / "page.md").write_text("# A `code` title\n\n## Same\n\n## Same\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](page.md#a-code-title) [ok2](page.md#same-1) [self](#top) [web](https://x.invalid/y)\n"
        "[gone](missing.md) [bad](page.md#nope)\n\n# Top\n\n```md\n[code](nowhere.md)\n```\n")
    assert broken_links(readme) == ["missing.md: no such file",
                                    "page.md#nope: no heading with that anchor in page.md"]
