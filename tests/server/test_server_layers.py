"""The releaser's layering (issue 9): handlers never reach the session, and nothing loops.

An AST check of every module of the installed ``fleetpush.server``;
``if TYPE_CHECKING:`` imports count like any other import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fleetpush.server
import pytest

PACKAGE = Path(fleetpush.server.__file__).parent
#: Handler modules and what they are built on: none may import the session or the listener.
BELOW_SESSION = ("device_api", "operator_api", "services", "fleet", "call")
FRONT_ENDS = ("fleetpush.cli", "fleetpush.demo", "fleetpush.bench")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(server modules imported, absolute modules imported) by one file."""
    local: set[str] = set()
    absolute: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            absolute.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                local.add(node.module.split(".")[0])
            elif node.level == 1:
                local.update(a.name for a in node.names)
            elif node.module:
                absolute.add(node.module)
                if node.module.startswith("fleetpush.server."):
                    local.add(node.module.split(".")[2])
    return local, absolute


GRAPH = {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_the_graph_is_the_expected_package() -> None:
    assert {"app", "session", "services", "fleet", "call", "device_api", "operator_api"} <= set(
        GRAPH
    )
    assert "operator" not in GRAPH  # renamed operator_api: one operator.py in the project


@pytest.mark.parametrize("module", BELOW_SESSION)
def test_handlers_and_services_never_import_the_session_or_listener(module: str) -> None:
    local, _ = GRAPH[module]
    assert not local & {"session", "app"}, f"{module} imports {sorted(local & {'session', 'app'})}"


def test_services_do_not_import_the_handlers() -> None:
    local, _ = GRAPH["services"]
    assert not local & {"device_api", "operator_api", "session", "app"}


def test_no_import_cycle_among_server_modules() -> None:
    graph = {
        m: {d for d in deps if d in GRAPH and d != "__init__"} for m, (deps, _) in GRAPH.items()
    }
    graph.pop("__init__")
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []


def test_server_never_imports_the_front_ends() -> None:
    offenders = {
        m: sorted(a for a in absolute if a.startswith(FRONT_ENDS))
        for m, (_, absolute) in GRAPH.items()
    }
    assert {m: bad for m, bad in offenders.items() if bad} == {}


def test_server_modules_stay_under_600_lines() -> None:
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 600} == {}
