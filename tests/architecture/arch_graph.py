"""The import graph of the *installed* fleetpush package, read from its source (STYLE.md §8).

A plain module with a unique name (tests/ has no packages). Modules are found
through the import system (``importlib.util.find_spec`` and each package's
``__path__``), never by walking the repository, so the pyproject
``package-dir`` mapping is honoured: ``protocol/`` is ``fleetpush.protocol``,
and a wheel install is read from site-packages.

An edge ``a -> b`` means that module ``a`` names module ``b`` in an import
statement anywhere in its source: at module level, inside a function, or
under ``if TYPE_CHECKING:`` (a cycle through a typing-only import is still a
cycle a reader has to follow). ``from x import y`` is an edge to ``x.y`` when
``x.y`` is a module and to ``x`` otherwise; relative imports are resolved
against the importing module's package. Only edges between fleetpush modules
are kept.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

ROOT = "fleetpush"

#: The layers under the root package. They live in other folders of the
#: repository (pyproject ``package-dir``), so they are looked up by name as
#: well as found through the imports that name them.
LAYERS = ("protocol", "net", "server", "client", "cli", "demo", "bench")


@attrs.frozen
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package a relative import in this module is resolved against."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    def source(self) -> str:
        return self.path.read_text(encoding="utf-8")


def _module(name: str) -> Module | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Module(name, Path(spec.origin), spec.submodule_search_locations is not None)


def _children(module: Module) -> Iterator[str]:
    spec = importlib.util.find_spec(module.name)
    assert spec is not None
    for info in pkgutil.iter_modules(list(spec.submodule_search_locations or ())):
        yield f"{module.name}.{info.name}"


def _imported_names(module: Module, tree: ast.AST) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(module named, names imported from it) for every import statement in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, tuple(a.name for a in node.names)


class ImportGraph:
    """Every module of the installed fleetpush package and the fleetpush modules it imports."""

    def __init__(self, root: str = ROOT, layers: Iterable[str] = LAYERS) -> None:
        self.modules: dict[str, Module] = {}
        self.edges: dict[str, set[str]] = {}
        self._trees: dict[str, ast.AST] = {}
        pending = [root, *(f"{root}.{layer}" for layer in layers)]
        while pending:
            name = pending.pop()
            if name in self.modules:
                continue
            module = _module(name)
            if module is None:
                continue
            self.modules[name] = module
            self._trees[name] = ast.parse(module.source(), filename=str(module.path))
            if module.is_package:
                pending.extend(_children(module))
            # A module named only in an import statement is found here too.
            for target, names in _imported_names(module, self._trees[name]):
                if target == root or target.startswith(root + "."):
                    pending.append(target)
                    pending.extend(f"{target}.{n}" for n in names if n != "*")
        for name, module in self.modules.items():
            self.edges[name] = set(self._targets(module))

    def _targets(self, module: Module) -> Iterator[str]:
        for target, names in _imported_names(module, self._trees[module.name]):
            if target not in self.modules:
                continue
            plain = True
            for n in names:
                if f"{target}.{n}" in self.modules:
                    yield f"{target}.{n}"
                else:
                    plain = False
            if plain and names:
                continue  # every name imported was a submodule: the edges are to those
            yield target

    def under(self, package: str) -> list[str]:
        """``package`` and every module inside it, sorted."""
        return sorted(n for n in self.modules if n == package or n.startswith(package + "."))

    def reachable(self, start: str) -> dict[str, str]:
        """Every module ``start`` imports, directly or not: module -> the module naming it."""
        seen: dict[str, str] = {}
        pending = [start]
        while pending:
            name = pending.pop()
            for target in sorted(self.edges.get(name, ())):
                if target not in seen and target != start:
                    seen[target] = name
                    pending.append(target)
        return seen

    def path(self, start: str, end: str) -> list[str]:
        """One import chain from ``start`` to ``end`` (for failure messages)."""
        parents = self.reachable(start)
        chain = [end]
        while chain[-1] != start:
            chain.append(parents[chain[-1]])
        return chain[::-1]

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (Tarjan), sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(v: str) -> None:
            # Iterative, so a deep graph cannot hit the recursion limit.
            work = [(v, iter(sorted(self.edges[v])))]
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            while work:
                node, children = work[-1]
                for w in children:
                    if w not in index:
                        index[w] = low[w] = len(index)
                        stack.append(w)
                        on_stack.add(w)
                        work.append((w, iter(sorted(self.edges[w]))))
                        break
                    if w in on_stack:
                        low[node] = min(low[node], index[w])
                else:
                    work.pop()
                    if work:
                        parent = work[-1][0]
                        low[parent] = min(low[parent], low[node])
                    if low[node] == index[node]:
                        component = []
                        while True:
                            w = stack.pop()
                            on_stack.discard(w)
                            component.append(w)
                            if w == node:
                                break
                        if len(component) > 1:
                            found.append(sorted(component))

        for name in sorted(self.modules):
            if name not in index:
                visit(name)
        return sorted(found)

    def cycle_through(self, component: Iterable[str]) -> list[str]:
        """One concrete import loop inside a strongly connected component."""
        members = set(component)
        start = min(members)
        parents: dict[str, str] = {}
        pending = [start]
        while pending:
            name = pending.pop(0)
            for target in sorted(self.edges[name] & members):
                if target == start:
                    chain = [name]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [*chain[::-1], start]
                if target not in parents:
                    parents[target] = name
                    pending.append(target)
        raise AssertionError(f"no loop through {start} in {sorted(members)}")
