"""Facts about the package's shape: its import graph (every import, also those inside functions),
import circles, module and function sizes. Used by tests/unit/test_architecture.py; run as a
script to print them."""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_tf2cntk"
WORKER = PACKAGE / "cntk" / "worker"  # Python 3.6 code run in the CNTK venv: no host imports


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    lines: int
    imports: frozenset[str]  # package modules it imports, anywhere in the file


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def modules() -> dict[str, Module]:
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {module_name(p) for p in paths}
    out = {}
    for path in paths:
        name = module_name(path)
        tree = ast.parse(path.read_text("utf-8"))
        found: set[str] = set()
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in names:  # "pkg.mod.attr" -> "pkg.mod"
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("pytest_tf2cntk"):
                    found.add(t)
        out[name] = Module(name, path, len(path.read_text("utf-8").splitlines()), frozenset(found))
    return out


def edges(mods: dict[str, Module]) -> dict[str, set[str]]:
    """Imports between modules; a package's own ``__init__`` importing is an edge too, but
    importing ``a.b`` does not count as importing the package ``a`` (its __init__ is trivial)."""
    return {m.name: {t for t in m.imports if not m.name.startswith(t + ".")} for m in mods.values()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def long_functions(limit: int) -> list[tuple[str, str, int]]:
    """(module, qualified function, lines) for every function longer than ``limit`` lines."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = (child.end_lineno or child.lineno) - child.lineno + 1
                    if n > limit:
                        out.append((module_name(path), prefix + child.name, n))
                    walk(child, prefix + child.name + ".")
                elif isinstance(child, ast.ClassDef):
                    walk(child, prefix + child.name + ".")

        walk(tree, "")
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest import chain below each module (0: imports nothing of the package)."""
    memo: dict[str, int] = {}

    def floor(v: str, seen: frozenset[str]) -> int:
        if v in memo:
            return memo[v]
        below = [floor(w, seen | {v}) for w in graph.get(v, ()) if w not in seen]
        memo[v] = 1 + max(below) if below else 0
        return memo[v]

    return {v: floor(v, frozenset()) for v in graph}


if __name__ == "__main__":
    mods = modules()
    g = edges(mods)
    print("circles:", cycles(g) or "none")
    print("floors:", max(floors(g).values()) + 1)
    print("modules over 600 lines:", [(m.name, m.lines) for m in mods.values() if m.lines > 600])
    print("functions over 80 lines:", long_functions(80))
