"""Fixtures of the architecture tests: the installed package's import graph, built once."""

from __future__ import annotations

import pytest
from arch_graph import ImportGraph


@pytest.fixture(scope="session")
def graph() -> ImportGraph:
    return ImportGraph()
