"""Kill the process at every crash point; recover() must leave exactly v1 or exactly v2.

Each case runs the operation in a fresh interpreter with
FLEETPUSH_TEST_CRASH_AT set, checks it died by SIGKILL, then runs recover()
and compares the whole app root (contents, modes, directories, no temp files)
with the tree of one release, and state.json and installed/manifest.signed
with that same release. Page cache survives a process kill, so this proves
the ordering of the protocol; the fsyncs are what carry it across power loss.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fleetpush.client.install import (
    CRASH_POINTS,
    apply_staged,
    load_installed_manifest,
    read_journal,
    recover,
)
from fleetpush.client.layout import PARTIAL_PREFIX, StateLayout
from fleetpush.client.state import load_state
from install_testlib import V1, V2, expected, run_py, snapshot, stage

APPLY = ("import sys; from fleetpush.client.install import apply_staged; "
         "apply_staged(sys.argv[1], sys.argv[2], '2.0', 200.0)")
ROLLBACK = ("import sys; from fleetpush.client.install import rollback; "
            "rollback(sys.argv[1], sys.argv[2], 'trial failed', now=300.0)")
RECOVER = ("import sys; from fleetpush.client.install import recover; "
           "recover(sys.argv[1], sys.argv[2], now=400.0)")

# Where recovery lands for each apply crash point (policy: install.py docstring).
APPLY_POINTS = {
    "apply-after-journal": "1.0",
    "apply-mid-backup": "1.0",
    "apply-after-backup": "1.0",
    "apply-install-started": "1.0",
    "apply-mid-remove": "1.0",
    "apply-mid-file": "1.0",
    "apply-mid-install": "1.0",
    "apply-after-install": "1.0",
    "apply-after-commit-journal": "2.0",
    "apply-after-manifest": "2.0",
    "apply-after-state": "2.0",
}
# The data crash points (issue 12) are test_data_crash.py's: never met without data.
DATA_POINTS = {p for p in CRASH_POINTS if "data" in p or "migrate" in p}
ROLLBACK_POINTS = [p for p in CRASH_POINTS if p.startswith("rollback-") and p not in DATA_POINTS]
TREES = {"1.0": expected(V1), "2.0": expected(V2)}


def test_every_crash_point_is_covered() -> None:
    assert set(CRASH_POINTS) - DATA_POINTS == {*APPLY_POINTS, *ROLLBACK_POINTS, "undo-mid-restore"}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    state, root = tmp_path / "state", tmp_path / "root"
    stage(state, "1.0", 1, V1)
    apply_staged(state, root, "1.0", 100.0)
    stage(state, "2.0", 2, V2)
    return state, root


def crash(code: str, state_dir: Path, root: Path, point: str) -> None:
    proc = run_py(code, str(state_dir), str(root), crash_at=point)
    assert proc.returncode == -signal.SIGKILL, f"did not die at {point}: {proc.stderr}"


def assert_consistent(state_dir: Path, root: Path, version: str) -> None:
    tree = snapshot(root)
    assert tree in TREES.values(), "the app root is a mix of versions"
    assert tree == TREES[version]
    state = load_state(state_dir)
    assert state.installed_version == version
    assert state.installed_sequence == {"1.0": 1, "2.0": 2}[version]
    installed = load_installed_manifest(state_dir)
    assert installed is not None and installed[1].version == version
    assert read_journal(state_dir) is None
    backups = StateLayout.of(state_dir).backups_dir
    assert not [p for p in backups.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


@pytest.mark.parametrize(("point", "lands_on"), APPLY_POINTS.items())
def test_crash_during_apply(dirs: tuple[Path, Path], point: str, lands_on: str) -> None:
    state_dir, root = dirs
    crash(APPLY, state_dir, root, point)
    assert read_journal(state_dir) is not None
    result = recover(state_dir, root, now=400.0)
    assert result is not None and result.version == lands_on
    assert_consistent(state_dir, root, lands_on)
    state = load_state(state_dir)
    if lands_on == "1.0":
        assert state.trial is None
        assert state.last_result is not None
        assert state.last_result["state"] == "apply-interrupted"
        # The update is still staged: the next apply succeeds.
        apply_staged(state_dir, root, "2.0", 500.0)
        assert_consistent(state_dir, root, "2.0")
    else:
        assert state.trial is not None and state.trial.version == "2.0"
    assert recover(state_dir, root) is None  # recovery is done, and stays done


def test_crash_while_recovering_an_apply(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    crash(APPLY, state_dir, root, "apply-mid-install")
    crash(RECOVER, state_dir, root, "undo-mid-restore")
    recover(state_dir, root, now=500.0)
    assert_consistent(state_dir, root, "1.0")
    events = [h for h in load_state(state_dir).history if h["state"] == "apply-interrupted"]
    assert len(events) == 1


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_crash_during_rollback(dirs: tuple[Path, Path], point: str) -> None:
    state_dir, root = dirs
    apply_staged(state_dir, root, "2.0", 200.0)
    crash(ROLLBACK, state_dir, root, point)
    result = recover(state_dir, root, now=400.0)
    assert result is not None and (result.op, result.action) == ("rollback", "completed")
    assert_consistent(state_dir, root, "1.0")
    state = load_state(state_dir)
    assert state.is_bad("2.0") and state.trial is None
    assert [h["state"] for h in state.history].count("rolled-back") == 1


@pytest.mark.parametrize("point", ["rollback-mid-restore", "rollback-after-restore"])
def test_crash_while_recovering_a_rollback(dirs: tuple[Path, Path], point: str) -> None:
    state_dir, root = dirs
    apply_staged(state_dir, root, "2.0", 200.0)
    crash(ROLLBACK, state_dir, root, "rollback-mid-restore")
    crash(RECOVER, state_dir, root, point)
    recover(state_dir, root, now=500.0)
    assert_consistent(state_dir, root, "1.0")
