"""Every module stays readable: under about 600 lines (STYLE.md §6, issue 9).

700 is a guard with some slack, not the target.
"""

from __future__ import annotations

from arch_graph import ImportGraph

MAX_LINES = 700


def test_every_module_is_under_the_size_limit(graph: ImportGraph) -> None:
    sizes = {name: len(m.source().splitlines()) for name, m in graph.modules.items()}
    too_long = sorted(f"{name}: {n} lines" for name, n in sizes.items() if n >= MAX_LINES)
    assert too_long == [], f"modules of {MAX_LINES} lines or more: {too_long}"
