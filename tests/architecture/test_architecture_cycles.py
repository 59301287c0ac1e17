"""No import cycles anywhere in the installed fleetpush package (issue 9).

"If two modules need each other, a third, smaller one is missing" (STYLE.md §8).
The graph includes function-local and TYPE_CHECKING imports: a cycle hidden
from the interpreter is still one a reader has to follow.
"""

from __future__ import annotations

from arch_graph import ImportGraph


def test_the_graph_sees_every_kind_of_import(graph: ImportGraph) -> None:
    # Guards the guard: the graph must be the real one, not an empty or partial one.
    assert len(graph.modules) >= 60
    assert "fleetpush.protocol" in graph.reachable("fleetpush.server.app")
    assert "fleetpush.protocol.keys" in graph.reachable("fleetpush.net.peer")


def test_no_import_cycles(graph: ImportGraph) -> None:
    cycles = graph.cycles()
    report = "\n".join(
        f"{len(c)} modules: {', '.join(c)}\n  e.g. {' -> '.join(graph.cycle_through(c))}"
        for c in cycles
    )
    assert cycles == [], f"import cycles in fleetpush:\n{report}"
