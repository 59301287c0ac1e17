"""Kill the process at every data crash point; recover() must leave one version whose
data matches it (issue 12, part 2).

As test_install_crash.py does for the code: the operation runs in a fresh
interpreter with FLEETPUSH_TEST_CRASH_AT set and must die by SIGKILL there;
then recover() runs and the app root, the database (by content), state.json
and the recorded data schema must all be those of one release.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from data_testlib import DB, SETTINGS, device, release, stage, without_db
from fleetpush.client import schema
from fleetpush.client.install import CRASH_POINTS, apply_staged, read_journal, recover
from fleetpush.client.layout import PARTIAL_PREFIX, StateLayout
from fleetpush.client.state import load_state
from fp_data import dump
from install_testlib import run_py, snapshot

__all__ = ["device"]  # the fixture

_SETUP = (
    "import sys; from fleetpush.client.data_settings import DataSettings; "
    "data = DataSettings(paths=('data/app.db', 'config.toml'), "
    "migrate_command=(sys.executable, 'migrate.py'), migrate_timeout=30.0); "
)
APPLY = _SETUP + (
    "from fleetpush.client.install import apply_staged; "
    "apply_staged(sys.argv[1], sys.argv[2], '3.0', 200.0, data=data)"
)
ROLLBACK = (
    "import sys; from fleetpush.client.install import rollback; "
    "rollback(sys.argv[1], sys.argv[2], 'by hand', now=300.0)"
)
RECOVER = (
    "import sys; from fleetpush.client.install import recover; "
    "recover(sys.argv[1], sys.argv[2], now=400.0)"
)

#: the data crash points of an apply; recovery always lands on 2.0 and its data.
APPLY_POINTS = ("apply-mid-data-backup", "apply-migrate-started", "apply-after-migrate")
DATA_POINTS = {*APPLY_POINTS, "undo-mid-data-restore", "rollback-mid-data-restore"}


def test_every_data_crash_point_is_covered() -> None:
    assert {p for p in CRASH_POINTS if "data" in p or "migrate" in p} == DATA_POINTS


def crash(code: str, state: Path, root: Path, point: str) -> None:
    proc = run_py(code, str(state), str(root), crash_at=point)
    assert proc.returncode == -signal.SIGKILL, f"did not die at {point}: {proc.stderr}"


def assert_on_2(state: Path, root: Path, tree: dict[str, object], db: str) -> None:
    # The migration's own log beside the app (neither code nor a data path) stays.
    (root / "migrate.log").unlink(missing_ok=True)
    assert without_db(snapshot(root)) == tree
    assert dump(root / DB) == db
    s = load_state(state)
    assert (s.installed_version, s.trial) == ("2.0", None)
    assert schema.read_record(StateLayout.of(state)) == schema.SchemaRecord(schema=1, version="2.0")
    assert read_journal(state) is None
    backups = StateLayout.of(state).backups_dir
    assert not [p for p in backups.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


@pytest.mark.parametrize("point", APPLY_POINTS)
def test_crash_during_a_migrating_apply(device: tuple[Path, Path], point: str) -> None:
    state, root = device
    tree, db = without_db(snapshot(root)), dump(root / DB)
    stage(state, "3.0", 3, release("3.0"), schema_version=2, min_schema=1)
    crash(APPLY, state, root, point)
    if point == "apply-after-migrate":
        assert "s2 TEXT" in dump(root / DB)  # the migration ran to its end
    result = recover(state, root, now=400.0)
    assert result is not None and (result.action, result.version) == ("undone", "2.0")
    assert_on_2(state, root, tree, db)
    # Still staged: the next apply migrates from the restored data (on the
    # migrated data its ALTER TABLE would fail: duplicate column s2).
    apply_staged(state, root, "3.0", 500.0, data=SETTINGS)
    assert (root / "migrate.log").read_text() == "migrated 1 2 3.0\n"


def test_crash_while_restoring_the_data_of_an_interrupted_migration(
    device: tuple[Path, Path],
) -> None:
    state, root = device
    tree, db = without_db(snapshot(root)), dump(root / DB)
    stage(state, "3.0", 3, release("3.0"), schema_version=2, min_schema=1)
    crash(APPLY, state, root, "apply-after-migrate")
    crash(RECOVER, state, root, "undo-mid-data-restore")
    recover(state, root, now=500.0)
    assert_on_2(state, root, tree, db)


def test_crash_during_a_rollback_across_a_migration(device: tuple[Path, Path]) -> None:
    state, root = device
    tree, db = without_db(snapshot(root)), dump(root / DB)
    stage(state, "3.0", 3, release("3.0"), schema_version=2, min_schema=1)
    apply_staged(state, root, "3.0", 200.0, data=SETTINGS)
    crash(ROLLBACK, state, root, "rollback-mid-data-restore")
    result = recover(state, root, now=400.0)
    assert result is not None and (result.op, result.version) == ("rollback", "2.0")
    assert_on_2(state, root, tree, db)
