"""Trial after apply (confirm, expiry, crash-on-start) and the apply-mode re-exec."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fleetpush.client.applymode import apply_mode_argv, read_saved_args, write_saved_args
from fleetpush.client.install import apply_staged
from fleetpush.client.layout import StateLayout
from fleetpush.client.state import load_state
from fleetpush.client.trial import Verdict, begin_start, check_trial, confirm
from install_testlib import V1, V2, expected, run_py, snapshot, stage


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    state, root = tmp_path / "state", tmp_path / "root"
    stage(state, "1.0", 1, V1)
    apply_staged(state, root, "1.0", 100.0)
    stage(state, "2.0", 2, V2)
    return state, root


def test_confirm_commits_and_keeps_the_backup(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    result = apply_staged(state_dir, root, "2.0", 200.0, trial_seconds=60)
    assert check_trial(state_dir, root, 230.0).verdict is Verdict.ON_TRIAL
    state = confirm(state_dir, 240.0, "2.0")
    assert state.trial is None and state.history[-1]["state"] == "committed"
    assert StateLayout.of(state_dir).backup_dir(result.backup or "").is_dir()
    assert not StateLayout.of(state_dir).update_dir("2.0").exists()
    assert check_trial(state_dir, root, 10_000.0).verdict is Verdict.NO_TRIAL
    assert snapshot(root) == expected(V2)
    assert confirm(state_dir, 250.0) == load_state(state_dir)  # idempotent


def test_unconfirmed_trial_expires_and_rolls_back(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    apply_staged(state_dir, root, "2.0", 200.0, trial_seconds=60)
    outcome = check_trial(state_dir, root, 261.0)
    assert outcome.verdict is Verdict.EXPIRED
    assert outcome.rollback is not None and outcome.rollback.version == "1.0"
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert state.installed_version == "1.0" and state.is_bad("2.0")


def test_version_crashing_on_every_start_is_rolled_back(dirs: tuple[Path, Path]) -> None:
    """Each "start" counts itself, then the new app dies at once (SIGKILL)."""
    state_dir, root = dirs
    apply_staged(state_dir, root, "2.0", 200.0)
    start_and_crash = (
        "import os, signal, sys; from fleetpush.client.trial import begin_start; "
        "o = begin_start(sys.argv[1], sys.argv[2], 210.0, max_starts=2); "
        "print(o.verdict.value, o.attempts, flush=True); "
        "o.verdict.value == 'on-trial' and os.kill(os.getpid(), signal.SIGKILL)"
    )
    seen = []
    for _ in range(3):
        proc = run_py(start_and_crash, str(state_dir), str(root))
        seen.append((proc.stdout.strip(), proc.returncode))
    assert seen == [
        ("on-trial 1", -signal.SIGKILL),
        ("on-trial 2", -signal.SIGKILL),
        ("too-many-starts 2", 0),
    ]
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert state.installed_version == "1.0" and state.is_bad("2.0") and state.trial is None
    assert begin_start(state_dir, root, 220.0).verdict is Verdict.NO_TRIAL  # no loop


def _app_script(tmp_path: Path) -> list[str]:
    marker = tmp_path / "ran"
    return [sys.executable, "-c",
            "import os, sys; open(sys.argv[1], 'w').write(os.getcwd())", str(marker)]


def test_apply_mode_applies_then_execs_run_mode(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    state_dir, root = dirs
    write_saved_args(state_dir, "2.0", _app_script(tmp_path), sys.executable, str(tmp_path))
    assert read_saved_args(state_dir, "2.0").argv[0] == sys.executable
    proc = subprocess.run(apply_mode_argv(state_dir, root, "2.0"), capture_output=True,
                          text=True, timeout=60, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran").read_text() == str(tmp_path)  # exec'd, in the saved cwd
    assert snapshot(root) == expected(V2)
    assert load_state(state_dir).trial is not None


def test_failed_apply_still_execs_run_mode_on_the_old_version(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    state_dir, root = dirs
    write_saved_args(state_dir, "2.0", _app_script(tmp_path), sys.executable, str(tmp_path))
    staged = StateLayout.of(state_dir).staged_files("2.0") / "lib/new.py"
    staged.write_bytes(b"tampered, and longer")  # a size the apply's check sees (§7.2)
    proc = subprocess.run(apply_mode_argv(state_dir, root, "2.0"), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran").exists()
    assert "previous version kept" in proc.stderr
    assert snapshot(root) == expected(V1)
    state = load_state(state_dir)
    assert state.installed_version == "1.0"
    assert state.last_result is not None and state.last_result["state"] == "apply-failed"


def test_apply_mode_no_start_reports_by_exit_code(dirs: tuple[Path, Path]) -> None:
    state_dir, root = dirs
    argv = apply_mode_argv(state_dir, root, "2.0", start=False)
    assert argv[-1] == "--no-start"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == expected(V2)
    proc = subprocess.run(apply_mode_argv(state_dir, root, "9.0", start=False),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert snapshot(root) == expected(V2)
