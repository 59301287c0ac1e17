"""Install by rename (issue 14): hard links instead of copies, unchanged files left alone,
no re-hash at apply, and the copy path kept where the app root is on another filesystem."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetpush.client.errors import StagingError
from fleetpush.client.install import apply_staged, mark_staged, read_journal, recover, rollback
from fleetpush.client.layout import StateLayout
from fleetpush.client.state import load_state
from fleetpush.client.trial import confirm
from fp_fs import small_tmpfs
from install_testlib import V1, V2, expected, run_py, snapshot, stage

REPO = Path(__file__).resolve().parents[2]
APPLY = ("import sys; from fleetpush.client.install import apply_staged; "
         "apply_staged(sys.argv[1], sys.argv[2], '2.0', 200.0)")
#: Files V1 and V2 hold alike (path, bytes, mode): unchanged by the apply.
UNCHANGED = frozenset(p for p in V2 if V1.get(p) == V2[p])


def ino(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


@pytest.fixture(params=["same-fs", "other-fs"])
def dirs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """v1 installed; the app root on the state's filesystem (links), or on a tmpfs (copies)."""
    state = tmp_path / "state"
    if request.param == "same-fs":
        root = tmp_path / "root"
        stage(state, "1.0", 1, V1)
        apply_staged(state, root, "1.0", 100.0)
        yield state, root
        return
    with small_tmpfs(tmp_path, "16m") as mnt:
        root = mnt / "root"
        stage(state, "1.0", 1, V1)
        apply_staged(state, root, "1.0", 100.0)
        yield state, root


def test_new_files_are_the_staged_inodes_and_old_ones_the_backups(
    dirs: tuple[Path, Path],
) -> None:
    state_dir, root = dirs
    linked = os.stat(state_dir).st_dev == os.stat(root).st_dev
    layout = StateLayout.of(state_dir)
    old = {p: ino(root / p) for p in ("bin/app", "lib/old.py")}
    stage(state_dir, "2.0", 2, V2)
    staged = {p: ino(layout.staged_files("2.0") / p) for p in V2}
    result = apply_staged(state_dir, root, "2.0", 200.0)
    assert snapshot(root) == expected(V2)
    files = layout.backup_dir(result.backup or "") / "files"
    for path in sorted(set(V2) - UNCHANGED):
        # Renamed into place: the bytes were never copied (or, across
        # filesystems, copied: the fallback).
        assert (ino(root / path) == staged[path]) is linked, path
    for path, before in old.items():
        assert (ino(files / path) == before) is linked, path  # the backup kept the old inode
    # The staged files stay whole until the trial ends: an undone apply can run again.
    assert {p: ino(layout.staged_files("2.0") / p) for p in V2} == staged
    rollback(state_dir, root, "trial failed", now=300.0)
    assert snapshot(root) == expected(V1)
    assert (ino(root / "bin/app") == old["bin/app"]) is linked


def test_unchanged_files_are_not_touched(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    assert {"data/keep.txt"} == UNCHANGED
    before = {p: (root / p).stat() for p in UNCHANGED}
    stage(state_dir, "2.0", 2, V2)
    result = apply_staged(state_dir, root, "2.0", 200.0)
    assert set(result.unchanged) == UNCHANGED and not UNCHANGED & set(result.installed)
    for path, st in before.items():
        now = (root / path).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (
            st.st_ino, st.st_mtime_ns, st.st_ctime_ns,
        ), path
    backup = StateLayout.of(state_dir).backup_dir(result.backup or "")
    assert not (backup / "files" / "data/keep.txt").exists()  # nothing to undo there


@pytest.mark.parametrize("verify", [True, False], ids=["verified-whole", "verified-by-chunk"])
def test_a_staging_area_without_the_unchanged_files_installs(
    dirs: tuple[Path, Path], verify: bool
) -> None:
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2, skip=UNCHANGED, verify=verify)
    assert not (StateLayout.of(state_dir).staged_files("2.0") / "data/keep.txt").exists()
    apply_staged(state_dir, root, "2.0", 200.0)
    assert snapshot(root) == expected(V2)
    rollback(state_dir, root, "trial failed", now=300.0)
    assert snapshot(root) == expected(V1)


def test_a_missing_unchanged_file_that_is_not_staged_stops_the_apply(
    dirs: tuple[Path, Path],
) -> None:
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2, skip=UNCHANGED)
    (root / "data/keep.txt").unlink()  # damaged since v1 was installed
    with pytest.raises(StagingError, match=r"lacks data/keep\.txt"):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert read_journal(state_dir) is None  # refused before anything was touched
    assert load_state(state_dir).installed_version == "1.0"


def test_mark_staged_still_hashes_files_it_did_not_see_verified(tmp_path: Path) -> None:
    """The verifying path, for a staging area filled by other means than the downloader."""
    state_dir = tmp_path / "state"
    stage(state_dir, "1.0", 1, V1)
    layout = StateLayout.of(state_dir)
    (layout.staged_files("1.0") / "bin/app").write_bytes(b"X" * len(V1["bin/app"][0]))
    with pytest.raises(StagingError, match="does not match"):
        mark_staged(state_dir, "1.0")
    # Without an installed manifest no file may be missing either.
    (layout.staged_files("1.0") / "bin/app").unlink()
    with pytest.raises(StagingError, match="lacks bin/app"):
        mark_staged(state_dir, "1.0")


def test_marker_says_how_the_files_were_verified(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    layout = StateLayout.of(state_dir)
    stage(state_dir, "1.0", 1, V1)
    assert json.loads(layout.staged_marker("1.0").read_text())["verified"] == "whole"
    stage(state_dir, "2.0", 2, V2, verify=False)
    assert json.loads(layout.staged_marker("2.0").read_text())["verified"] == "chunks"


@pytest.mark.parametrize("point", ["apply-mid-backup", "apply-mid-file", "apply-mid-install"])
def test_a_kill_mid_apply_is_undone_and_the_staged_release_applies_again(
    dirs: tuple[Path, Path], point: str
) -> None:
    state_dir, root = dirs
    stage(state_dir, "2.0", 2, V2, skip=UNCHANGED)
    proc = run_py(APPLY, str(state_dir), str(root), crash_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    result = recover(state_dir, root, now=400.0)
    assert result is not None and result.action == "undone"
    assert snapshot(root) == expected(V1)
    apply_staged(state_dir, root, "2.0", 500.0)  # nothing was consumed by the undone apply
    assert snapshot(root) == expected(V2)
    confirm(state_dir, 600.0)
    assert not StateLayout.of(state_dir).update_dir("2.0").exists()
    assert snapshot(root) == expected(V2)  # dropping the staged links left the app alone


def test_apply_bench_prints_its_figures(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "apply_bench.py"), "--size-mib", "1",
         "--files", "2", "--runs", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["bench"], out["size_mib"], out["files"], out["runs"]) == ("apply", 1, 2, 1)
    for key in ("apply_s", "fsync_s", "apply_without_fsync_s"):
        assert set(out[key]) == {"median", "min", "max"}
