"""The architecture, read from the code's imports (``ast``): no module imports another module's
private names, the library never imports the application, and no import cycle except type-only
ones (imports under ``if TYPE_CHECKING:``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders installed under other names (setup.cfg's package_dir).
MAPPED = {"sparseham.methods": ROOT / "methods", "sparseham.analysis": ROOT / "analysis"}
# The application: the subpackages of the training app, the plug-ins, the reports, the commands.
APPLICATION = tuple(f"sparseham.{name}" for name in (
    "config", "data", "models", "train", "methods", "analysis", "integrations", "cli", "__main__", "export"))


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name."""
    found = {}
    roots = {"sparseham": ROOT / "sparseham", **MAPPED}
    for name, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


MODULES = modules()
LIBRARY = sorted(m for m in MODULES if not any(m == a or m.startswith(a + ".") for a in APPLICATION))


def _type_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:``."""
    lines = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", "")) == "TYPE_CHECKING":
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt)
                      if isinstance(n, ast.ImportFrom | ast.Import)}
    return lines


def imports(module: str) -> list[tuple[str, list[str], bool]]:
    """``(imported module, names taken from it, type-only)`` for each import of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only = _type_only(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno in typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [a.name for a in node.names]
            # ``from . import x`` imports the module x when there is one
            subs = [n for n in names if f"{base}.{n}" in MODULES]
            out += [(f"{base}.{n}", [], node.lineno in typing_only) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest:
                out.append((base, rest, node.lineno in typing_only))
    return [(m, names, t) for m, names, t in out if m.split(".")[0] == "sparseham"]


def test_the_tree_is_read():
    assert {"sparseham.ham", "sparseham._step.one_pass", "sparseham.methods.rigl",
            "sparseham.analysis.report", "sparseham.integrations.hf"} <= set(MODULES)
    assert "sparseham._step.one_pass" in LIBRARY and "sparseham.train.trainer" not in LIBRARY


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_private_names(module):
    private = [f"{m}.{n}" for m, names, _ in imports(module) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, f"{module} imports private names: {private}"


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_never_imports_the_application(module):
    bad = sorted({m for m, _, _ in imports(module) for a in APPLICATION if m == a or m.startswith(a + ".")})
    assert not bad, f"{module} (library) imports the application: {bad}"


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports at run time (type-only imports left out)."""
    edges = {}
    for module in MODULES:
        targets = {m for m, _, typing in imports(module) if not typing}
        # ``import a.b.c`` also runs a and a.b: only the deepest module counts as the arrow.
        edges[module] = {t if t in MODULES else t.rpartition(".")[0] for t in targets} - {module}
    return {m: {t for t in ts if t in MODULES} for m, ts in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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


def test_no_import_cycle_but_type_only_ones():
    # A package's __init__ that re-exports its modules is not a cycle with them: leave those arrows out.
    edges = {m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in graph().items()}
    assert cycles(edges) == []
