"""The releaser's storage backend under test: SQLite (default) or PostgreSQL (issue 15).

Every test has a ``storage_backend`` (autouse): ``"sqlite"`` unless its module
is in :data:`BOTH_BACKENDS`, whose tests run twice, once on each backend. On
``"postgres"`` the fixture takes a fresh database from fp_pg's ``pg_url``
(skipped without PostgreSQL locally, required in CI) and :func:`database`
returns its URL, which the releaser helpers pass on: fp_releaser's
``releaser_config`` as ``ServerConfig.database``, the subprocess helpers as
``--database``; ``$FLEETPUSH_DATABASE`` is set too, so helpers that open a
data dir's database (publish, ``ReleaseStore.open``) and subprocesses follow it.

The postgres runs are marked ``postgres`` like every fp_pg test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

#: Test modules (file names) whose every test runs on both backends: those
#: that exercise the releaser's stores (registry, pushes, deployments, events,
#: releases lifecycle, enrolment, fleet views). The rest run on SQLite only,
#: to keep CI within its budget. test_cli_deploy.py and test_hostile_acks.py
#: timed out on PostgreSQL under load while its calls ran on the trio thread;
#: they run on both since the hot paths moved to worker threads
#: (server/db_calls.py).
BOTH_BACKENDS = frozenset(
    {
        "test_push_store.py",
        "test_server_push.py",
        "test_server_deploy.py",
        "test_server_releases.py",
        "test_server_auth.py",
        "test_server_reoffer.py",
        "test_server_device_scope.py",
        "test_server_duplicate_id.py",
        "test_cli_fleet_views.py",
        "test_cli_devices_forget.py",
        "test_web_security.py",
        "test_server_scrub.py",
        "test_p2p_tracker.py",
        "test_cli_p2p_view.py",
        "test_cli_deploy.py",
        "test_hostile_acks.py",
    }
)

_current: str | None = None


def database() -> str | None:
    """The PostgreSQL URL of the running test's backend, or None (SQLite)."""
    return _current


def database_args() -> list[str]:
    """``fleetpush server`` arguments selecting the running test's backend."""
    return [] if _current is None else ["--database", _current]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        "storage_backend" in metafunc.fixturenames
        and Path(str(metafunc.definition.fspath)).name in BOTH_BACKENDS
    ):
        metafunc.parametrize("storage_backend", ["sqlite", "postgres"], indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("storage_backend") == "postgres":
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def storage_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    global _current
    backend: str = getattr(request, "param", "sqlite")
    if backend == "postgres":
        _current = request.getfixturevalue("pg_url")
        # Helpers that open a data dir before any releaser recorded the URL
        # there (publish before start), and subprocesses, follow the variable.
        request.getfixturevalue("monkeypatch").setenv("FLEETPUSH_DATABASE", _current)
    try:
        yield backend
    finally:
        _current = None
