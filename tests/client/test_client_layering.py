"""The device side's layering (issue 9, STYLE.md §8): steps are given what they need.

The steps of an update (update_check, update_stage, forced_push, commands,
trial_watch, reporting, hosts, context...) receive an UpdateContext or
callables; none imports updater.py, the orchestrator that calls them. Only
the front ends that compose an Updater may: ``__init__.py`` and ``agent.py``
(thread_handle.py is allowed too, and needs not). An AST check of every import,
``TYPE_CHECKING`` ones included, plus a subprocess check that importing a step
does not load the orchestrator.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fleetpush.client

PACKAGE = Path(fleetpush.client.__file__).parent

#: the modules that may import updater.py (they compose an Updater).
FRONT_ENDS = {"__init__.py", "agent.py", "thread_handle.py"}

#: the step modules named by issue 9; each must exist and stay a step.
STEPS = {
    "context.py",
    "commands.py",
    "forced_push.py",
    "hosts.py",
    "reporting.py",
    "trial_watch.py",
    "update_check.py",
    "update_stage.py",
}


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as ``fleetpush.client.x`` for relative imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:  # client/ is one package: level 1 is fleetpush.client
                assert node.level == 1, f"{path.name}: import beyond the package"
                base = "fleetpush.client" + (f".{node.module}" if node.module else "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_step_module_imports_the_updater() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    names = {p.name for p in files}
    assert names >= STEPS and "updater.py" in names
    offenders = sorted(
        path.name
        for path in files
        if path.name not in FRONT_ENDS | {"updater.py"}
        and "fleetpush.client.updater" in _imported_modules(path)
    )
    assert offenders == []


def test_client_never_imports_the_front_ends_of_the_package() -> None:
    # client/ is a library: the command line, demo and bench are built on it.
    offenders = sorted(
        f"{path.name}: {mod}"
        for path in sorted(PACKAGE.glob("*.py"))
        for mod in _imported_modules(path)
        if mod.split(".")[:2]
        in (["fleetpush", "cli"], ["fleetpush", "demo"], ["fleetpush", "bench"])
    )
    assert offenders == []


def test_importing_the_steps_does_not_load_the_updater() -> None:
    steps = ", ".join(f"fleetpush.client.{name[:-3]}" for name in sorted(STEPS))
    # fleetpush/client/__init__.py imports the updater; the steps are loaded
    # without running it, as a new step module would be.
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('fleetpush.client')\n"
        "pkg = types.ModuleType('fleetpush.client')\n"
        "pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['fleetpush.client'] = pkg\n"
        f"import {steps}\n"
        "print('fleetpush.client.updater' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
