"""Package structure, read from the source with ``ast`` (nothing is imported): the habits of STYLE.md §9.

* no module imports another bobench module's ``_private`` names: a name shared across modules is public;
* no import cycle among bobench modules, lazy imports inside functions included (they only defer a
  design cycle to run time); imports under ``if TYPE_CHECKING:`` are ignored, they never run;
* no module is longer than :data:`MAX_LINES` (the guideline is ~400: split before this hard stop).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "bobench"
MAX_LINES = 450


@cache
def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, type_checking: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``node``, at any depth; those under ``if TYPE_CHECKING:`` only if asked."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test) and not type_checking:
            for sub in child.orelse:
                yield from _import_nodes(ast.Module(body=[sub], type_ignores=[]))
        else:
            yield from _import_nodes(child, type_checking)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name an ``ImportFrom`` in ``module`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_package = _modules()[module].name == "__init__.py"
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse(_modules()[module].read_text(), filename=str(_modules()[module]))


@cache
def _imports(module: str, type_checking: bool = False) -> tuple[tuple[str, str | None, int], ...]:
    """``(bobench module imported, name imported from it or None, line)`` for each import in ``module``.

    ``from bobench.x import y`` is an import of the module ``bobench.x.y`` when that module exists,
    else of the name ``y`` from ``bobench.x``. Imports under ``if TYPE_CHECKING:`` only if asked.
    """
    tree = _tree(module)
    known = _modules()
    out = []
    for node in _import_nodes(tree, type_checking):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
            continue
        source = _absolute(module, node)
        if source.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            out.append((sub, None, node.lineno) if sub in known else (source, alias.name, node.lineno))
    return tuple(out)


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module in known:
        for target, _, _ in _imports(module):
            # `import bobench.a.b` of something that is not a module file: count its nearest module
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path ``[a, b, ..., a]`` per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is ~100 modules, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_path_through(sorted(c)[0], c, graph) for c in components]


def _path_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from ``start`` back to itself inside ``component`` (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle but no path back was found")  # pragma: no cover


def _where(module: str, target: str) -> str:
    lines = sorted({line for t, _, line in _imports(module) if t == target or t.startswith(f"{target}.")})
    return f"{_modules()[module].relative_to(SRC)}:{','.join(map(str, lines))}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _private_attributes(module: str) -> Iterator[tuple[str, str, int]]:
    """``(bobench module, private name, line)`` for each ``m._name`` where ``m`` is a bobench module."""
    aliases = {}  # local name -> the bobench module it is bound to
    for node in _import_nodes(_tree(module), type_checking=True):
        for alias in node.names:
            if isinstance(node, ast.Import) and alias.name.split(".")[0] == PACKAGE:
                aliases[alias.asname or PACKAGE] = alias.name if alias.asname else PACKAGE
            elif isinstance(node, ast.ImportFrom) and f"{_absolute(module, node)}.{alias.name}" in _modules():
                aliases[alias.asname or alias.name] = f"{_absolute(module, node)}.{alias.name}"
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node.value)
            head, _, rest = (chain or "").partition(".")
            if head in aliases:
                target = ".".join(filter(None, (aliases[head], rest)))
                if target != module:
                    yield target, node.attr, node.lineno


def test_the_package_is_found() -> None:
    assert f"{PACKAGE}.store" in _modules() and f"{PACKAGE}.backbones.weights" in _modules()
    assert sum(len(_imports(m)) for m in _modules()) > 100  # the walker sees imports, lazy ones too


def test_no_private_names_imported_across_modules() -> None:
    offenders = [
        f"{_modules()[m].relative_to(SRC)}:{line}: {source}{'' if name is None else ' import ' + name}"
        for m in _modules()
        for source, name, line in _imports(m, type_checking=True)  # a type is a shared name too
        if _private(source.rsplit(".", 1)[-1] if name is None else name)
    ]
    offenders += [
        f"{_modules()[m].relative_to(SRC)}:{line}: {source}.{name}"
        for m in _modules()
        for source, name, line in _private_attributes(m)
    ]
    assert not offenders, "private names imported from another module (make them public):\n" + "\n".join(
        offenders
    )


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    message = [
        " -> ".join(cycle) + "\n    " + "; ".join(_where(a, b) for a, b in itertools.pairwise(cycle))
        for cycle in cycles
    ]
    assert not cycles, "import cycles (module-level and lazy imports):\n" + "\n".join(message)


def test_no_module_is_too_long() -> None:
    lengths = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    long = sorted((n, str(_modules()[m].relative_to(SRC))) for m, n in lengths.items() if n > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split them, one noun each): " + ", ".join(
        f"{path} ({n})" for n, path in reversed(long)
    )


def test_checks_catch_what_they_look_for() -> None:
    """The walkers themselves, on hand-made sources: a lazy cycle, a private import, TYPE_CHECKING."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from bobench.b import Thing\n"
        "def f():\n    from bobench.b import _hidden\n"
    )
    nodes = list(_import_nodes(ast.parse(source)))
    assert [(n.module, [a.name for a in n.names]) for n in nodes] == [
        ("typing", ["TYPE_CHECKING"]),
        ("bobench.b", ["_hidden"]),
    ]
    assert len(list(_import_nodes(ast.parse(source), type_checking=True))) == 3
    relative = ast.ImportFrom(module="errors", names=[ast.alias("WeightsError")], level=1)
    assert _absolute("bobench.backbones", relative) == "bobench.backbones.errors"  # from a package
    assert _absolute("bobench.backbones.weights", relative) == "bobench.backbones.errors"  # a sibling
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
