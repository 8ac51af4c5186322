"""The package's import structure (issue 19): no import runs back up a layer, and no two modules import each
other, directly or around a loop. Every import statement counts, lazy ones inside functions included: a lazy
import hides an edge from the top of the file, it does not remove it.

Layers, lowest first (a module may import its own layer and the ones below):
    errors, config -> checkpoint -> model, data -> train, vocab, prune (and the test harness) -> cli -> compress
    -> demo -> __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "megatron_prune"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE
LAYERS = {  # first part of the module path (below the package) -> layer
    "__init__": 0, "errors": 0, "config": 0,
    "checkpoint": 1,
    "model": 2, "data": 2,
    "train": 3, "vocab": 3, "prune": 3, "testing": 3,
    "cli": 4,
    "compress": 5,
    "demo": 6,
    "__main__": 7,
}
# Known violating edges (importer, imported) that work in progress may list while it removes them; empty.
ALLOWED: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """'prune.run' -> its file, for every module of the package ('__init__' for the package itself)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module that `import PACKAGE.name` loads (a name inside a module: that module)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in `path` (module level, functions, TYPE_CHECKING blocks)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                up = package[:len(package) - node.level + 1]
                base = ".".join([PACKAGE, *up, *([base] if base else [])])
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                mod = _resolve(t[len(PACKAGE) + 1:] or "__init__", known)
                if mod is not None and mod != name:
                    found.add(mod)
    # `from pkg.sub import mod` also names pkg.sub (the package __init__): count the most specific only
    return {m for m in found if not any(o != m and o.startswith(m + ".") for o in found)}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert not [m for m in modules() if m.split(".")[0] not in LAYERS]


def test_no_import_runs_up_a_layer():
    up = sorted((a, b) for a, deps in graph().items() for b in deps
                if layer(b) > layer(a) and (a, b) not in ALLOWED)
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(f"  {a} -> {b}" for a, b in up)


def test_no_import_circle():
    edges = {a: {b for b in deps if (a, b) not in ALLOWED} for a, deps in graph().items()}
    found = cycles(edges)
    assert not found, "import circles:\n" + "\n".join("  " + " <-> ".join(c) for c in found)


def test_the_allow_list_holds_only_edges_that_still_exist():
    """Once a branch removes one of the known edges, its entry goes too (so it cannot come back unseen)."""
    g = graph()
    gone = sorted(e for e in ALLOWED if e[1] not in g.get(e[0], set()))
    assert not gone, f"delete from ALLOWED, these imports are gone: {gone}"


def test_the_checker_sees_lazy_imports_and_circles(tmp_path):
    """The parser counts an import inside a function, and the cycle finder finds a three-module loop."""
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    known["a"].write_text("def f():\n    from megatron_prune.b import g\n")
    known["b"].write_text("import megatron_prune.a\n")
    assert imports_of("a", known["a"], known) == {"b"} and imports_of("b", known["b"], known) == {"a"}
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
