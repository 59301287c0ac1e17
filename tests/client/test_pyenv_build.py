"""A release's Python env on the device (issue 12, part 1): built offline from its
own signed files, smoke-checked, switched by a symlink that follows the
installed manifest through apply, rollback and kill -9.

Every wheel is written by fp_wheels in the test; pip and uv run for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fleetpush.client import pyenv
from fleetpush.client.install import apply_staged, recover, rollback
from fleetpush.client.layout import StateLayout
from fleetpush.client.staging import load_staged
from fleetpush.protocol.manifest import PythonEnv
from fp_wheels import lock_line, make_wheel
from install_testlib import Files, run_py, stage

WHEELS = ".fleetpush/python/wheels"
LOCK = ".fleetpush/python/requirements.lock"
TOOLS = ["pip", pytest.param("uv", marks=pytest.mark.skipif(
    pyenv.find_uv() is None, reason="uv is not installed (pip install 'fleetpush[python]')"
))]


def release(tmp: Path, version: str, pkgs: dict[str, str], extra_lock: str = "") -> Files:
    """App files plus wheels of ``pkgs`` (name -> version) and their lock."""
    wheel_dir = tmp / f"wheels-{version}"
    files: Files = {"app.py": (f"VERSION = {version!r}\n".encode(), 0o644)}
    lock = ""
    for name, ver in sorted(pkgs.items()):
        w = make_wheel(wheel_dir, name, ver)
        files[f"{WHEELS}/{w.name}"] = (w.read_bytes(), 0o644)
        lock += lock_line(w)
    files[LOCK] = ((lock + extra_lock).encode(), 0o644)
    return files


def env_of(imports: list[str] | None = None) -> PythonEnv:
    return PythonEnv(lock=LOCK, wheels=WHEELS, imports=imports or [], python="3.11")


def env_python(path: Path, code: str) -> str:
    done = subprocess.run(
        [str(path / "bin" / "python"), "-I", "-c", code],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return done.stdout.strip()


def link(state: Path) -> str | None:
    try:
        return os.readlink(state / "envs" / "current")
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("tool", TOOLS)
def test_env_is_built_from_the_release_files_and_smoke_checked(tmp_path: Path, tool: str) -> None:
    state = tmp_path / "state"
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0", "beta": "2.5"}),
          python=env_of(["alpha", "beta"]))
    layout = StateLayout.of(state)
    manifest = load_staged(layout, "2.0")[2]
    path = pyenv.prepare(layout, tmp_path / "app", manifest, pyenv.BuildSettings(tool=tool))
    assert path == state / "envs" / "2.0-2"
    assert (path / ".complete").is_file()
    assert env_python(path, "import alpha, beta; print(alpha.__version__, beta.__version__)") == (
        "1.0 2.5"
    )
    # Nothing was switched: only an apply moves envs/current.
    assert link(state) is None


def test_a_failing_smoke_check_keeps_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0"}),
          python=env_of(["alpha", "not_in_the_lock"]))
    layout = StateLayout.of(state)
    with pytest.raises(pyenv.EnvError) as e:
        pyenv.prepare(layout, tmp_path / "app", load_staged(layout, "2.0")[2])
    assert str(e.value) == (
        "environment: smoke check failed: "
        "ModuleNotFoundError: No module named 'not_in_the_lock'"
    )
    assert not (state / "envs" / "2.0-2").exists()


def test_a_lock_naming_a_missing_wheel_reports_pips_last_error_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    extra = "gamma==1.0 --hash=sha256:" + "0" * 64 + "\n"
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0"}, extra), python=env_of())
    layout = StateLayout.of(state)
    with pytest.raises(pyenv.EnvError) as e:
        pyenv.prepare(layout, tmp_path / "app", load_staged(layout, "2.0")[2],
                      pyenv.BuildSettings(tool="pip"))
    assert str(e.value) == "environment: ERROR: No matching distribution found for gamma==1.0"
    assert not (state / "envs" / "2.0-2").exists()


def test_a_wheel_changed_after_staging_is_refused_before_pip_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    files = release(tmp_path, "2.0", {"alpha": "1.0"})
    stage(state, "2.0", 2, files, python=env_of())
    layout = StateLayout.of(state)
    wheel = next(p for p in files if p.endswith(".whl"))
    (layout.staged_files("2.0") / wheel).write_bytes(b"not the signed wheel")
    with pytest.raises(pyenv.EnvError, match="does not match the signed manifest"):
        pyenv.prepare(layout, tmp_path / "app", load_staged(layout, "2.0")[2])


def test_apply_switches_the_link_and_rollback_switches_it_back(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "app"
    stage(state, "1.0", 1, release(tmp_path, "1.0", {"alpha": "1.0"}), python=env_of(["alpha"]))
    apply_staged(state, root, "1.0", 1000.0)
    assert link(state) == "1.0-1"
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "2.0", "beta": "1.0"}),
          python=env_of(["alpha", "beta"]))
    apply_staged(state, root, "2.0", 1001.0)  # builds the env itself: no agent here
    assert link(state) == "2.0-2"
    current = pyenv.current_env(StateLayout.of(state))
    assert current is not None
    assert env_python(current, "import alpha, beta; print(alpha.__version__)") == "2.0"
    v1_env = state / "envs" / "1.0-1"
    built = (v1_env / ".complete").stat().st_mtime_ns

    rollback(state, root, "test")
    assert link(state) == "1.0-1"
    # Switched back, not rebuilt: the v1 env is the same directory, untouched.
    assert (v1_env / ".complete").stat().st_mtime_ns == built
    current = pyenv.current_env(StateLayout.of(state))
    assert current == v1_env.resolve()
    assert env_python(current, "import alpha; print(alpha.__version__)") == "1.0"
    # 2.0 failed and has no backup leading back to it: its env is pruned.
    assert sorted(n for n in os.listdir(state / "envs") if n != ".cache") == ["1.0-1", "current"]


def test_a_release_without_env_removes_the_link_and_rollback_restores_it(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "app"
    stage(state, "1.0", 1, release(tmp_path, "1.0", {"alpha": "1.0"}), python=env_of())
    apply_staged(state, root, "1.0", 1000.0)
    stage(state, "2.0", 2, {"app.py": (b"plain\n", 0o644)})
    apply_staged(state, root, "2.0", 1001.0)
    assert link(state) is None
    rollback(state, root, "test")
    assert link(state) == "1.0-1"


@pytest.mark.parametrize("point", ["env-mid-build", "env-built"])
def test_kill9_during_the_env_build_leaves_the_installed_version_whole(
    tmp_path: Path, point: str
) -> None:
    state, root = tmp_path / "state", tmp_path / "app"
    stage(state, "1.0", 1, release(tmp_path, "1.0", {"alpha": "1.0"}), python=env_of())
    apply_staged(state, root, "1.0", 1000.0)
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "2.0"}), python=env_of(["alpha"]))
    code = (
        "import sys; from fleetpush.client.install import apply_staged; "
        "apply_staged(sys.argv[1], sys.argv[2], '2.0', 1001.0)"
    )
    done = run_py(code, str(state), str(root), crash_at=point)
    assert done.returncode == -9, done.stderr
    recover(state, root)
    assert link(state) == "1.0-1"
    assert (root / "app.py").read_text() == "VERSION = '1.0'\n"
    env2 = state / "envs" / "2.0-2"
    assert (env2 / ".complete").is_file() == (point == "env-built")
    # The next attempt finishes the job, rebuilding an interrupted env.
    apply_staged(state, root, "2.0", 1002.0)
    assert link(state) == "2.0-2"
    assert env_python(env2, "import alpha; print(alpha.__version__)") == "2.0"


def test_the_env_is_built_with_no_network_at_all(tmp_path: Path) -> None:
    """In a new user + network namespace only a (down) loopback exists: any
    attempt to reach an index would fail the build."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.decode().strip()}")
    # The namespace really has no route out.
    no_route = subprocess.run(
        [unshare, "-rn", sys.executable, "-c",
         "import socket; socket.create_connection(('192.0.2.1', 80), timeout=2)"],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert no_route.returncode != 0
    assert "unreachable" in no_route.stderr.lower()
    state = tmp_path / "state"
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0", "beta": "1.0"}),
          python=env_of(["alpha", "beta"]))
    for tool in ["pip", "uv"] if pyenv.find_uv() else ["pip"]:
        shutil.rmtree(state / "envs", ignore_errors=True)
        done = subprocess.run(
            [unshare, "-rn", sys.executable, "-m", "fleetpush.client.pyenv",
             "--state", str(state), "--root", str(tmp_path / "app"), "--version", "2.0",
             "--tool", tool],
            capture_output=True, text=True, check=False, timeout=300,
        )
        assert done.returncode == 0, f"{tool}: {done.stderr}"
        assert done.stdout.strip() == str(state / "envs" / "2.0-2")
        assert env_python(state / "envs" / "2.0-2", "import beta; print(beta.__version__)") == "1.0"


def test_apply_mode_reexecs_the_saved_python_command_in_the_new_env(tmp_path: Path) -> None:
    from fleetpush.client.applymode import write_saved_args

    state, root = tmp_path / "state", tmp_path / "app"
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "3.1"}), python=env_of(["alpha"]))
    code = "import sys, alpha; print(sys.prefix, alpha.__version__)"
    write_saved_args(state, "2.0", [sys.executable, "-c", code], sys.executable, str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "fleetpush.client.applymode",
         "--state", str(state), "--root", str(root), "--version", "2.0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str((state / "envs" / "2.0-2").resolve()), "3.1"]
