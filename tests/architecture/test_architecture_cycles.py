"""No import cycles anywhere in the installed fleetpush package (issue 9).

"If two modules need each other, a third, smaller one is missing" (STYLE.md §8).
The graph includes function-local and TYPE_CHECKING imports: a cycle hidden
from the interpreter is still one a reader has to follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_the_graph_finds_hidden_cycles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package whose only cycles go through a TYPE_CHECKING import, a function-local
    # import, and `from . import submodule`: the graph must see all three.
    pkg = tmp_path / "fp_arch_sample"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "from . import a\nB = 1\n",
        "c.py": "def f():\n    from fp_arch_sample.sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\n",
        "e.py": "from fp_arch_sample.a import TYPE_CHECKING\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    sample = ImportGraph("fp_arch_sample", layers=())
    assert sample.cycles() == [
        ["fp_arch_sample.a", "fp_arch_sample.b"],
        ["fp_arch_sample.c", "fp_arch_sample.sub.d"],
    ]
    assert sample.edges["fp_arch_sample.e"] == {"fp_arch_sample.a"}
    assert sample.cycle_through(["fp_arch_sample.b", "fp_arch_sample.a"]) == [
        "fp_arch_sample.a",
        "fp_arch_sample.b",
        "fp_arch_sample.a",
    ]
