"""The import rules of docs/architecture.md hold: every module imports only modules of its
own stage or a lower one, nothing imports in a cycle, an import inside a function says why
it is lazy, and importing a stage in a fresh interpreter loads no module of a higher one.

The stage table is read from docs/architecture.md, so the page and the test cannot drift."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
from test_imports import _imports

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "layoutc"

# At most this many imports inside functions, each with its ``# lazy:`` reason, counted
# over the whole package.
LAZY_LIMIT = 20  # the 20th: layoutc.deepspeed, importable without torch and DeepSpeed


# ---------------------------------------------------------------------- the stage table


def _stages() -> dict[str, int]:
    """``{module or package: stage number}`` from the table of docs/architecture.md."""
    rows = re.findall(r"^\| (\d+) \w+ \| (.+?) \|", DOC.read_text(), re.M)
    table = {name: int(n) for n, cell in rows for name in re.findall(r"`([\w.]+)`", cell)}
    assert len({int(n) for n, _ in rows}) >= 8, rows  # the table was found
    return table


STAGES = _stages()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def stage(module: str) -> int:
    """The stage of a module: its most specific entry in the table (the root only by name)."""
    names = [n for n in STAGES if module == n or (n != "layoutc" and module.startswith(n + "."))]
    assert names, f"{module} is in no stage of docs/architecture.md"
    return STAGES[max(names, key=len)]


def _is_namespace(path: Path) -> bool:
    """A package ``__init__`` with nothing but a docstring: importing it loads nothing."""
    body = ast.parse(path.read_text()).body
    return all(
        (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        or (isinstance(n, ast.ImportFrom) and n.module == "__future__")
        for n in body
    )


# ---------------------------------------------------------------------- the imports


class _Import:
    def __init__(self, target: str, line: int, local: bool) -> None:
        self.target, self.line, self.local = target, line, local


def _target(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str) -> list[_Import]:
    """Every import of ``module`` that runs (those under ``if TYPE_CHECKING:`` never do)."""
    path = MODULES[module]
    found: list[_Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit_else(child, local)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                if not (isinstance(child, ast.ImportFrom) and child.module == "__future__"):
                    for t in _target(module, path, child):
                        found.append(_Import(t, child.lineno, local))
            else:
                inside = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                visit(child, inside)

    def visit_else(node: ast.If, local: bool) -> None:
        for child in node.orelse:
            visit(ast.Module(body=[child], type_ignores=[]), local)

    visit(ast.parse(path.read_text()), False)
    return found


def _internal(target: str) -> str | None:
    """The layoutc module an import loads, or None for another package's."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _unknown(breaches: set[tuple[str, str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, t in breaches)


# ---------------------------------------------------------------------- the rules


def test_every_module_is_in_a_stage_of_the_table():
    for module in MODULES:
        stage(module)
    listed = {n for n in STAGES if n not in MODULES}
    assert not listed, f"the table names modules that do not exist: {sorted(listed)}"


def test_every_module_imports_only_its_own_stage_or_lower_ones():
    breaches = set()
    for module in MODULES:
        for imp in imports(module):
            target = _internal(imp.target)
            if target is not None and stage(target) > stage(module):
                breaches.add((module, target))
    assert not _unknown(breaches), "\n".join(
        f"{b} (stage {stage(b.split()[0])} may not import stage {stage(b.split()[-1])})"
        for b in _unknown(breaches)
    )


def test_no_modules_import_each_other_in_a_cycle():
    """Imports inside functions count: a cycle broken by a local import is still a cycle.
    (A submodule loads its package first; that edge is Python's, not the module's.)"""
    graph = {
        m: {t for i in imports(m) if (t := _internal(i.target)) is not None and t != m}
        for m in MODULES
    }
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*path[path.index(t) :], t])
            elif t not in state:
                walk(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_inside_a_function_says_why_it_is_lazy():
    lines = {m: p.read_text().splitlines() for m, p in MODULES.items()}
    unexplained, lazy = set(), 0
    for module in MODULES:
        for imp in imports(module):
            if not imp.local:
                continue
            here = lines[module][imp.line - 1]
            above = lines[module][imp.line - 2]
            if "# lazy:" in here or above.strip().startswith("# lazy:"):
                lazy += 1
            else:
                unexplained.add((module, _internal(imp.target) or imp.target.split(".")[0]))
    assert not _unknown(unexplained), "\n".join(_unknown(unexplained))
    assert lazy <= LAZY_LIMIT, f"{lazy} lazy imports; at most {LAZY_LIMIT}: import at the top"


@functools.cache
def _layoutc(code: str) -> set[str]:
    """The layoutc modules running ``code`` in a fresh interpreter imports."""
    return {m for m in _imports(code) if m.split(".")[0] == "layoutc"}


def _above(modules: set[str], limit: int) -> list[str]:
    return sorted(
        m for m in modules if m in MODULES and not _is_namespace(MODULES[m]) and stage(m) > limit
    )


def test_importing_the_package_loads_nothing_above_its_stage():
    root = _layoutc("import layoutc")
    assert "layoutc.place" in root  # the probe ran
    assert not _above(root, stage("layoutc"))


@pytest.mark.parametrize("n", sorted(set(STAGES.values())))
def test_importing_a_stage_loads_no_module_of_a_higher_stage(n: int):
    """Every module of stage ``n`` imported in a fresh interpreter (after the package root,
    which Python loads first anyway): no module above ``n`` comes with them."""
    mine = [m for m in MODULES if stage(m) == n and m != "layoutc.__main__"]  # __main__ runs
    new = _layoutc("; ".join(f"import {m}" for m in mine)) - _layoutc("import layoutc")
    assert not _above(new, n), _above(new, n)
