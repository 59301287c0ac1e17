"""Hostile paths: traversal and symlinks planted in the app root or staging never
lead to a write outside the root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fleetpush.client import fsutil
from fleetpush.client.errors import ApplyError, StagingError, UnsafePathError
from fleetpush.client.install import apply_staged
from fleetpush.client.layout import StateLayout
from fleetpush.client.state import load_state
from install_testlib import V1, V2, expected, snapshot, stage


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    state, root, outside = tmp_path / "state", tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"do not touch")
    stage(state, "1.0", 1, V1)
    apply_staged(state, root, "1.0", 100.0)
    stage(state, "2.0", 2, V2)
    return state, root, outside


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../x", "a//b", "./a", ""])
def test_fsutil_refuses_traversal(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafePathError):
        fsutil.replace_file(root, bad, [b"x"], 0o644)
    with pytest.raises(UnsafePathError):
        fsutil.safe_open_for_write(root, bad)
    with pytest.raises(UnsafePathError):
        fsutil.safe_path(root, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert not any(root.iterdir())


def test_fsutil_refuses_symlinked_directories(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "lib").symlink_to(outside)
    (root / "file").symlink_to(outside / "target")
    for path in ("lib/x", "lib/deeper/x", "file"):
        with pytest.raises(UnsafePathError):
            fsutil.safe_open_for_write(root, path)
        with pytest.raises(UnsafePathError):
            fsutil.safe_path(root, path)
    with pytest.raises(UnsafePathError):
        fsutil.replace_file(root, "lib/x", [b"x"], 0o644)
    assert not any(outside.iterdir())
    # Replacing a symlinked *file* swaps the link itself, never writes through it.
    fsutil.replace_file(root, "file", [b"mine"], 0o644)
    assert not (root / "file").is_symlink() and (root / "file").read_bytes() == b"mine"
    assert not any(outside.iterdir())


def test_symlinked_directory_in_app_root_stops_the_apply(dirs: tuple[Path, Path, Path]) -> None:
    state_dir, root, outside = dirs
    shutil.move(root / "lib", outside / "lib")
    (root / "lib").symlink_to(outside / "lib")
    before_outside, before_root = snapshot(outside), snapshot(root)
    with pytest.raises((ApplyError, UnsafePathError)):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert snapshot(outside) == before_outside
    assert snapshot(root) == before_root
    assert load_state(state_dir).installed_version == "1.0"


def test_symlinked_file_in_app_root_is_never_written_through(
    dirs: tuple[Path, Path, Path],
) -> None:
    state_dir, root, outside = dirs
    (root / "bin" / "app").unlink()
    (root / "bin" / "app").symlink_to(outside / "victim")
    with pytest.raises((ApplyError, UnsafePathError)):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert (outside / "victim").read_bytes() == b"do not touch"
    assert load_state(state_dir).installed_version == "1.0"


def test_symlink_in_staging_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    state_dir, root, outside = dirs
    files = StateLayout.of(state_dir).staged_files("2.0")
    shutil.move(files / "lib", outside / "lib")
    (files / "lib").symlink_to(outside / "lib")  # same bytes, reached through a link
    with pytest.raises(StagingError):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert snapshot(root) == expected(V1)


def test_fifo_at_a_release_path_does_not_hang(dirs: tuple[Path, Path, Path]) -> None:
    state_dir, root, _outside = dirs
    (root / "lib" / "new.py").parent.mkdir(exist_ok=True)
    os.mkfifo(root / "lib" / "new.py")
    with pytest.raises((ApplyError, UnsafePathError)):
        apply_staged(state_dir, root, "2.0", 200.0)
    assert load_state(state_dir).installed_version == "1.0"
