"""The path of one proxied request drawn in docs/architecture.md is the path the code takes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def drawn_modules() -> set[str]:
    """The modules named in the document's drawing of the path (`server/gateway` and so on)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The path of one proxied request", 1)[1]
    drawing = section.split("```", 2)[1]
    names = set()
    for folder, module in re.findall(r"\b(server|gateway|store|core|service|grants)/(\w+)",
                                      drawing):
        names.add(f"grants.{module}" if folder == "grants" else f"broker.{folder}.{module}")
    return names


def test_the_traced_request_enters_exactly_the_drawn_modules() -> None:
    proc = subprocess.run([sys.executable, "scripts/trace_request.py", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    traced = json.loads(proc.stdout)["modules"]
    assert len(traced) == len(set(traced))
    assert set(traced) == drawn_modules()
    assert len(traced) <= 13  # twenty before the request path was trimmed; never back up
