"""Where an env build finds its files, and what a full disk does to it.

- A release that keeps a wheel of the installed version need not stage it:
  the build takes it from the app root, checked against the signed digest.
- A full disk is not the release's fault: it is caught before the build (or
  from the tool's ENOSPC), reported, and the release stays staged and is not
  marked bad, so it is built again once space is freed.

Real pip builds on a real (tmpfs) filesystem.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fleetpush.client import pyenv
from fleetpush.client.config import UpdaterConfig
from fleetpush.client.context import StateStore, UpdateContext
from fleetpush.client.env_step import prepare_env
from fleetpush.client.errors import DiskFullError
from fleetpush.client.install import apply_staged
from fleetpush.client.layout import StateLayout
from fleetpush.client.staging import load_staged
from fleetpush.client.state import load_state
from fp_fs import fill, small_tmpfs
from fp_keys import RELEASE_KEY, key_hex
from install_testlib import stage
from test_pyenv_build import WHEELS, env_of, env_python, release


def test_an_unchanged_wheel_is_taken_from_the_app_root(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "app"
    stage(state, "1.0", 1, release(tmp_path, "1.0", {"alpha": "1.0"}), python=env_of(["alpha"]))
    apply_staged(state, root, "1.0", 1000.0)
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0", "beta": "2.0"}),
          python=env_of(["alpha", "beta"]))
    layout = StateLayout.of(state)
    staged_wheels = layout.staged_files("2.0") / WHEELS
    alpha = next(staged_wheels.glob("alpha-*.whl"))
    assert (root / WHEELS / alpha.name).read_bytes() == alpha.read_bytes()
    alpha.unlink()  # as a downloader that skips unchanged files leaves it
    path = pyenv.prepare(layout, root, load_staged(layout, "2.0")[2],
                         pyenv.BuildSettings(tool="pip"))
    assert path is not None
    assert env_python(path, "import alpha, beta; print(alpha.__version__, beta.__version__)") == (
        "1.0 2.0"
    )


def test_a_wheel_in_neither_place_is_named(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "app"
    stage(state, "1.0", 1, release(tmp_path, "1.0", {"alpha": "1.0"}), python=env_of())
    apply_staged(state, root, "1.0", 1000.0)
    stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "2.0"}), python=env_of())
    layout = StateLayout.of(state)
    wheel = next((layout.staged_files("2.0") / WHEELS).glob("alpha-*.whl"))
    wheel.unlink()  # and the installed alpha is 1.0: not the signed bytes
    with pytest.raises(pyenv.EnvError, match=f"{WHEELS}/{wheel.name} is missing from"):
        pyenv.prepare(layout, root, load_staged(layout, "2.0")[2])
    assert not (state / "envs" / "2.0-2").exists()


def test_a_full_disk_is_refused_before_the_build(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "24m") as mnt:
        state = mnt / "state"
        stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0"}), python=env_of())
        layout = StateLayout.of(state)
        manifest = load_staged(layout, "2.0")[2]
        assert pyenv.space_needed(manifest) > 24 * 1024 * 1024 - shutil.disk_usage(mnt).used
        with pytest.raises(DiskFullError, match=r"environment of 2\.0: \d+ bytes needed on .*envs"):
            pyenv.prepare(layout, tmp_path / "app", manifest, pyenv.BuildSettings(tool="pip"))
        assert not (state / "envs" / "2.0-2").exists()


def test_a_tool_that_runs_out_of_space_raises_disk_full(tmp_path: Path) -> None:
    """The estimate can be wrong (other writers, big packages): the tool's own
    ENOSPC is recognised too, and the partial env removed."""
    with small_tmpfs(tmp_path, "64m") as mnt:
        state = mnt / "state"
        stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0"}), python=env_of())
        layout = StateLayout.of(state)
        manifest = load_staged(layout, "2.0")[2]
        calls = 0

        def run(argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[int, str]:
            nonlocal calls
            calls += 1
            code, out = pyenv.run_subprocess(argv, env, cwd, timeout)
            if calls == 1:  # the venv exists: now fill the disk under pip
                fill(mnt / "ballast")
            return code, out

        settings = pyenv.BuildSettings(tool="pip", run=run)
        with pytest.raises(DiskFullError, match="no space left on device"):
            pyenv.prepare(layout, tmp_path / "app", manifest, settings)
        assert not (state / "envs" / "2.0-2").exists()


class _Reports:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str | None]] = []

    async def progress(self, state: str, version: str | None = None, **kw: object) -> None:
        self.lines.append(("progress", state, str(kw.get("error")) if kw.get("error") else None))

    async def record(self, result: str, version: str | None, error: str | None = None) -> None:
        self.lines.append(("record", result, error))

    def poke(self) -> None:
        pass


async def test_a_full_disk_does_not_mark_the_release_bad(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "24m") as mnt:
        state = mnt / "state"
        stage(state, "2.0", 2, release(tmp_path, "2.0", {"alpha": "1.0"}), python=env_of())
        cfg = UpdaterConfig(app="demo", state_dir=state, app_root=tmp_path / "app",
                            env_builder="pip", trusted_keys=[key_hex(RELEASE_KEY)],
                            insecure=True)
        reports = _Reports()
        store = StateStore(state, load_state(state))
        ctx = UpdateContext(config=cfg, layout=StateLayout.of(state), roots=None,  # type: ignore[arg-type]
                            store=store, reporter=reports, link=None,  # type: ignore[arg-type]
                            spawner=None)  # type: ignore[arg-type]
        assert not await prepare_env(ctx, "2.0")
        after = load_state(state)
        assert not after.is_bad("2.0")
        assert after.staged is not None and after.staged.version == "2.0"
        assert reports.lines[-1][:2] == ("record", "failed")
        assert "bytes needed on" in str(reports.lines[-1][2])
        # Space freed (the tmpfs grown): the same staged release builds now.
        subprocess.run(["mount", "-o", "remount,size=96m", str(mnt)], check=True, timeout=20)
        assert await prepare_env(ctx, "2.0")
        assert (state / "envs" / "2.0-2" / ".complete").is_file()
        assert reports.lines[-1][:2] == ("progress", "preparing_env")
