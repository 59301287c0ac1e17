"""The dashboard reaches the releaser only through what it is given (STYLE.md §8).

server/web/ gets the operator methods' route table and the services passed in
(server/app.py); it never imports the session, the releaser's listener or the
operator client, so a web action can only be one the operator protocol allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fleetpush.server.web as web

WEB = Path(web.__file__).parent
#: Modules of fleetpush.server the dashboard must not import.
FORBIDDEN = {"session", "app", "admission", "device_api"}


def _imports(path: Path) -> set[str]:
    """The fleetpush.server modules ``path`` imports, by their last name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 2:  # from ..x import y
                found.add(module.split(".")[0] if module else "")
                if not module:
                    found.update(a.name for a in node.names)
            elif module.startswith("fleetpush.server."):
                found.add(module.split(".")[2])
            elif module.startswith("fleetpush.operator"):
                found.add("operator client")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fleetpush.server."):
                    found.add(alias.name.split(".")[2])
    return found


def test_the_dashboard_never_imports_the_session_or_the_listener() -> None:
    files = sorted(WEB.glob("*.py"))
    assert len(files) >= 5  # the check looks where the code is
    assert {"call", "services"} <= _imports(WEB / "ops.py")  # and sees relative imports
    for path in files:
        bad = _imports(path) & (FORBIDDEN | {"operator client"})
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_its_assets_are_in_the_package() -> None:
    for name in ("app.js", "style.css"):
        assert (WEB / "static" / name).is_file(), name
