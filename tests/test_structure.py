"""Each module of runner_gateway depends one way: no import circles, counting
imports inside functions too (a package and its own modules aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import runner_gateway

_ROOT = Path(runner_gateway.__file__).parent


def _imports() -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for path in _ROOT.rglob("*.py"):
        parts = path.relative_to(_ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        modules[name] = found
    graph: dict[str, set[str]] = {}
    for name, found in modules.items():
        graph[name] = {
            other
            for other in found & set(modules)
            # A package's __init__ re-exporting its own modules is not a circle.
            if other != name
            and not other.startswith(name + ".")
            and not name.startswith(other + ".")
        }
    return graph


def test_no_import_circles() -> None:
    graph = _imports()
    circles = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for other in graph[node]:
                if other == start:
                    circles.append(" -> ".join([*path, start]))
                elif other not in seen:
                    seen.add(other)
                    stack.append((other, [*path, other]))
    assert circles == []


def test_the_gateway_modules_are_seen() -> None:
    graph = _imports()
    assert "runner_gateway.edge.site" in graph["runner_gateway.service"]
    assert "runner_gateway.service" in graph["runner_gateway.workers"]
