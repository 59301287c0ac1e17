"""apply_staged / rollback on real files: v1 -> v2 and back, backups, bad releases, disk full."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fleetpush.client.errors import ApplyError, DiskFullError, RollbackError, StagingError
from fleetpush.client.install import (
    MAX_APPLY_ATTEMPTS,
    apply_staged,
    load_installed_manifest,
    read_journal,
    rollback,
)
from fleetpush.client.layout import KEEP_BACKUPS, StateLayout
from fleetpush.client.state import load_state
from install_testlib import V1, V2, expected, snapshot, stage


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    state, root = tmp_path / "state", tmp_path / "root"
    stage(state, "1.0", 1, V1)
    apply_staged(state, root, "1.0", 100.0)
    return state, root


def test_first_install_is_exact_and_committed(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert (state.installed_version, state.installed_sequence, state.high_water) == ("1.0", 1, 1)
    assert state.trial is None  # nothing to roll back to
    assert state.staged is None
    assert state.last_result is not None and state.last_result["state"] == "committed"
    loaded = load_installed_manifest(state_dir)
    assert loaded is not None and loaded[1].version == "1.0"


def test_apply_v1_to_v2_adds_changes_removes_and_sets_modes(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2)
    result = apply_staged(state_dir, root, "2.0", 200.0, trial_seconds=60)
    assert snapshot(root) == expected(V2)  # olddir/ is gone, newdir/sub/ exists
    assert set(result.removed) == {"lib/old.py", "olddir/only.txt"}
    assert "data/keep.txt" in result.unchanged and "data/keep.txt" not in result.installed
    assert "data/mode.txt" in result.installed  # same bytes, new mode
    assert result.previous_version == "1.0" and result.trial_deadline == 260.0
    state = load_state(state_dir)
    assert state.installed_version == "2.0" and state.installed_sequence == 2
    assert state.trial is not None and state.trial.previous_version == "1.0"
    assert state.trial.backup_dir == result.backup
    assert read_journal(state_dir) is None
    loaded = load_installed_manifest(state_dir)
    assert loaded is not None and loaded[1].version == "2.0"
    # The backup holds exactly the files the apply replaced or removed, and v1's manifest.
    bdir = StateLayout.of(state_dir).backup_dir(result.backup or "")
    saved = {p.relative_to(bdir / "files").as_posix() for p in (bdir / "files").rglob("*")
             if p.is_file()}
    assert saved == {"bin/app", "lib/core.py", "lib/old.py", "olddir/only.txt",
                     "data/mode.txt", "conf/secret.cfg"}
    assert (bdir / "manifest.signed").read_bytes() == (
        StateLayout.of(state_dir).staged_manifest("1.0").read_bytes()
    )


def test_reapplying_the_installed_version_is_a_no_op(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    before = snapshot(root)
    assert apply_staged(state_dir, root, "1.0", 300.0).changed is False
    assert snapshot(root) == before


def test_mode_bits_are_masked(tmp_path: Path) -> None:
    state_dir, root = tmp_path / "s", tmp_path / "r"
    stage(state_dir, "1.0", 1, {"x": (b"x", 0o4777), "y": (b"y", 0o666)})
    apply_staged(state_dir, root, "1.0", 1.0)
    assert snapshot(root) == {"x": ("file", 0o755, b"x"), "y": ("file", 0o644, b"y")}


def test_rollback_restores_v1_byte_for_byte(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    v1_manifest = StateLayout.of(state_dir).installed_manifest.read_bytes()
    stage(state_dir, "2.0", 2, V2)
    applied = apply_staged(state_dir, root, "2.0", 200.0)
    result = rollback(state_dir, root, "health check failed", now=300.0)
    assert (result.version, result.failed_version) == ("1.0", "2.0")
    assert snapshot(root) == expected(V1)
    assert StateLayout.of(state_dir).installed_manifest.read_bytes() == v1_manifest
    state = load_state(state_dir)
    assert (state.installed_version, state.installed_sequence) == ("1.0", 1)
    assert state.high_water == 2  # never lowered by a rollback
    assert state.trial is None and state.is_bad("2.0")
    assert state.history[-1]["state"] == "rolled-back"
    assert state.history[-1]["error"] == "2.0: health check failed"  # which failed, and why
    assert not StateLayout.of(state_dir).backup_dir(applied.backup or "").exists()
    assert not StateLayout.of(state_dir).update_dir("2.0").exists()
    with pytest.raises(RollbackError):
        rollback(state_dir, root, "again", now=400.0)  # nothing leads back from 1.0


def test_a_bad_release_is_not_retried_unless_pushed_again(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2)
    apply_staged(state_dir, root, "2.0", 200.0)
    rollback(state_dir, root, "crashed", now=300.0)
    stage(state_dir, "2.0", 2, V2)
    with pytest.raises(StagingError, match="failed on this device before"):
        apply_staged(state_dir, root, "2.0", 400.0)
    assert snapshot(root) == expected(V1)
    stage(state_dir, "2.0", 2, V2, forced=True)  # an operator pushes it again
    apply_staged(state_dir, root, "2.0", 500.0)
    assert snapshot(root) == expected(V2)
    assert not load_state(state_dir).is_bad("2.0")


def test_sequence_below_high_water_is_refused(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    stage(state_dir, "3.0", 3, V2)
    stage(state_dir, "2.0", 2, V2, record=False)
    with pytest.raises(StagingError, match="below"):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert snapshot(root) == expected(V1)


def test_backups_are_pruned_to_the_newest_five(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    names = []
    for n in range(2, 10):
        files = {**V1, "bin/app": (f"v{n}".encode(), 0o755)}
        stage(state_dir, f"{n}.0", n, files)
        names.append(apply_staged(state_dir, root, f"{n}.0", 100.0 * n).backup)
    kept = sorted(p.name for p in StateLayout.of(state_dir).backups_dir.iterdir())
    assert len(kept) == KEEP_BACKUPS
    assert sorted(names[-KEEP_BACKUPS:]) == kept  # type: ignore[type-var]


def test_staged_content_damaged_after_marking_is_refused(dirs: tuple[Path, Path]) -> None:
    # Apply trusts STAGED for the content (no re-hash, PROTOCOL.md §7.2) and
    # checks each staged file's size: damage that changes the size is refused.
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2)
    target = StateLayout.of(state_dir).staged_files("2.0") / "bin/app"
    target.write_bytes(b"X" * (len(V2["bin/app"][0]) - 1))
    with pytest.raises(StagingError, match="does not match"):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert state.installed_version == "1.0"
    assert state.last_result is not None and state.last_result["state"] == "apply-failed"


def test_missing_marker_means_not_staged(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2)
    StateLayout.of(state_dir).staged_marker("2.0").unlink()
    with pytest.raises(StagingError, match="STAGED"):
        apply_staged(state_dir, root, "2.0", 200.0)


def test_apply_attempts_are_bounded(dirs: tuple[Path, Path]) -> None:
    """A staged version whose apply keeps dying ends up bad instead of looping."""
    from install_testlib import run_py

    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2)
    code = ("import sys; from fleetpush.client.install import apply_staged, recover; "
            "recover(sys.argv[1], sys.argv[2]); "
            "apply_staged(sys.argv[1], sys.argv[2], '2.0', 200.0)")
    for _ in range(MAX_APPLY_ATTEMPTS):
        proc = run_py(code, str(state_dir), str(root), crash_at="apply-mid-install")
        assert proc.returncode == -9, proc.stderr
    with pytest.raises(ApplyError, match="marked bad"):
        apply_staged(state_dir, root, "2.0", 300.0)
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert state.is_bad("2.0") and state.staged is None and state.installed_version == "1.0"


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("check_space", [True, False], ids=["preflight", "enospc-mid-install"])
def test_disk_full_keeps_the_old_version(
    tmp_path: Path, small_fs: Path, check_space: bool
) -> None:
    state_dir, root = tmp_path / "state", small_fs / "app"
    stage(state_dir, "1.0", 1, V1)
    apply_staged(state_dir, root, "1.0", 100.0)
    # bin/app (sorted first) fits; the 2 MiB file after it cannot.
    big = {**V2, "zz/big.bin": (b"\xa5" * (2 * 1024 * 1024), 0o644)}
    stage(state_dir, "2.0", 2, big)
    backups_before = sorted(StateLayout.of(state_dir).backups_dir.iterdir())
    with pytest.raises(DiskFullError) as caught:
        apply_staged(state_dir, root, "2.0", 200.0, check_space=check_space)
    # The pre-flight check refuses up front; without it the real ENOSPC from
    # writing zz/big.bin (after other files were replaced) is undone.
    assert ("bytes needed" if check_space else "no space left") in str(caught.value)
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert state.installed_version == "1.0" and state.trial is None
    assert state.last_result is not None and state.last_result["state"] == "apply-failed"
    assert read_journal(state_dir) is None
    assert sorted(StateLayout.of(state_dir).backups_dir.iterdir()) == backups_before
