#!/usr/bin/env python3
"""Fail on an import cycle among the project's modules, or on a layer imported upwards.

Every `import` counts, in-function ones included: a cycle hidden inside a function is
still a cycle for whoever reads the code. Layers are listed lowest first; a module may
import its own layer and those below, never one above. `grants` imports nothing of
`broker`. Run by the test command; exit 1 names the cycle or the offending import.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("grants", "broker")

# Lowest first. A module not listed under a layer prefix is an error, so a new folder must
# say where it stands.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("grants",),
    ("broker", "broker.core"),
    ("broker.gateway",),
    ("broker.config",),
    ("broker.store", "broker.team"),
    ("broker.service",),
    ("broker.client",),
    ("broker.server",),
    ("broker.cli", "broker.__main__"),
)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The project modules `name` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: the module pkg.name where there is one, else pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or not (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            group.append(node)
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    problems = []
    for name, path in known.items():
        for target, line in imports(name, path, known):
            graph[name].add(target)
            here, there = layer_of(name), layer_of(target)
            rel = path.relative_to(ROOT)
            if name.startswith("grants") and target.startswith("broker"):
                problems.append(f"{rel}:{line}: grants must not import {target}")
            elif here is None:
                problems.append(f"{rel}: {name} is in no layer; add it to LAYERS")
            elif there is not None and there > here:
                problems.append(f"{rel}:{line}: {name} imports {target}, a higher layer")
    for group in cycles(graph):
        problems.append("import cycle among: " + ", ".join(group))
    for problem in sorted(set(problems)):
        print(problem)
    if not problems:
        print(f"imports: {len(known)} modules, no cycle, every import points down")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
