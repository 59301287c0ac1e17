"""``fleetpush agent`` running releases that carry a Python env (issue 12, part 1),
as real processes over a real releaser, with real pip/uv and wheels written here.

The app (tests/apps/env_app) answers which version it is, which ``alpha`` it
imports and which ``sys.prefix`` it runs in, so each check asks the app itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from fleet_helpers import ask_version, read_status
from fleetpush.server.pyenv_publish import resolve_env
from fp_agent import AGENT_DEFAULTS, AgentDevice
from fp_devices import DeviceDir
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, push, releaser
from fp_trees import app_release
from fp_wheels import make_wheel

from fleetpush.operator import connect as operator_connect


class EnvAgentDevice(AgentDevice):
    """dev-1 running tests/apps/env_app as ``{python} app.py STATUS`` under an agent."""

    def __init__(self, tmp_path: Path, port: int, **settings: object) -> None:
        DeviceDir.__init__(
            self, tmp_path, port, "env_app", "agent.log", AGENT_DEFAULTS, settings
        )
        self.procs = []

    def app_command(self) -> list[str]:
        return ["{python}", str(self.app_root / "app.py"), str(self.status)]

    def link(self) -> str | None:
        try:
            return os.readlink(self.state_dir / "envs" / "current")
        except FileNotFoundError:
            return None


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-8000:])


async def publish_env_release(
    handle: object, tmp_path: Path, version: str, pkgs: dict[str, str], imports: list[str],
    behavior: str = "ok",
) -> None:
    wheelhouse = tmp_path / f"wh-{version}"
    for name, ver in pkgs.items():
        make_wheel(wheelhouse, name, ver)
    env = resolve_env(tmp_path / f"work-{version}", wheelhouse=wheelhouse, imports=imports)
    src = app_release(tmp_path, "env_app", version, behavior)
    await publish_and_approve(handle, tmp_path / "data", src, version, env=env)  # type: ignore[arg-type]


async def answer(dev: EnvAgentDevice, version: str, not_pid: int | None = None) -> tuple[str, int]:
    port, _, pid = await read_status(dev.status, version, not_pid=not_pid)
    return await ask_version(port), pid


def env_prefix(dev: EnvAgentDevice) -> str:
    return str((dev.state_dir / "envs" / "current").resolve())


@pytest.mark.slow
async def test_env_releases_run_in_their_env_fail_safely_and_roll_back(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(150):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            await publish_env_release(handle, tmp_path, "2.0.0", {"alpha": "1.0"}, ["alpha"])
            await publish_env_release(
                handle, tmp_path, "3.0.0", {"alpha": "1.5"}, ["alpha", "missing_mod"]
            )
            await publish_env_release(
                handle, tmp_path, "4.0.0", {"alpha": "2.0", "beta": "1.0"}, ["alpha"], "crash"
            )
            dev = EnvAgentDevice(tmp_path, handle.port)
            await dev.start_agent()
            try:
                # 1.0.0 carries no env: {python} is the agent's own interpreter.
                said, _ = await answer(dev, "1.0.0")
                assert said.startswith("1.0.0 alpha=none prefix=")
                assert dev.link() is None
                await dev.wait_state(lambda s: s.history == ())

                # 1.0.0 -> 2.0.0 adds alpha: the app runs in the new env.
                await push(handle, "2.0.0")
                said, pid2 = await answer(dev, "2.0.0")
                assert dev.link() == "2.0.0-1"
                assert said == f"2.0.0 alpha=1.0 prefix={env_prefix(dev)}"
                await dev.wait_state(lambda s: s.installed_version == "2.0.0" and s.trial is None)

                # 3.0.0 fails its smoke check: 2.0.0 is never stopped.
                await push(handle, "3.0.0")
                async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                    with trio.fail_after(60):
                        while True:
                            (info,) = await op.list_devices(app="demo")
                            last = info.last_result or {}
                            if last.get("version") == "3.0.0":
                                break
                            await trio.sleep(0.2)
                assert last["state"] == "failed"
                assert last["error"] == (
                    "environment: smoke check failed: "
                    "ModuleNotFoundError: No module named 'missing_mod'"
                )
                _, _, pid = await read_status(dev.status, "2.0.0")
                assert pid == pid2
                os.kill(pid2, 0)  # still the same, running process
                assert dev.link() == "2.0.0-1"
                assert not (dev.state_dir / "envs" / "3.0.0-2").exists()
                assert dev.state().installed_version == "2.0.0"
                assert "3.0.0" in dev.state().bad_releases  # not rebuilt at every check

                # 4.0.0 builds fine but crashes: rolled back, and so is the env.
                await push(handle, "4.0.0")
                s = await dev.wait_state(lambda s: "4.0.0" in s.bad_releases and s.trial is None)
                assert s.installed_version == "2.0.0"
                said, _ = await answer(dev, "2.0.0", not_pid=pid2)
                assert dev.link() == "2.0.0-1"
                assert said == f"2.0.0 alpha=1.0 prefix={env_prefix(dev)}"
            finally:
                codes = await dev.stop_agents()
            assert codes == [0]


@pytest.mark.slow
async def test_kill9_of_the_agent_during_the_env_build(
    tmp_path: Path, agent_log: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(150):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            await publish_env_release(handle, tmp_path, "2.0.0", {"alpha": "1.0"}, ["alpha"])
            # venv + pip here (agent.toml's env_builder), uv where it is found elsewhere.
            dev = EnvAgentDevice(tmp_path, handle.port, env_builder="pip")
            monkeypatch.setenv("FLEETPUSH_TEST_CRASH_AT", "env-mid-build")
            first = await dev.start_agent()
            monkeypatch.delenv("FLEETPUSH_TEST_CRASH_AT")
            try:
                await answer(dev, "1.0.0")
                await dev.wait_state(lambda s: s.history == ())
                await push(handle, "2.0.0")
                with trio.fail_after(60):
                    await first.wait()
                assert first.returncode == -9
                # Killed mid-build: the half-built env is not a complete one.
                (env_dir,) = (dev.state_dir / "envs").glob("2.0.0-*")
                assert not (env_dir / ".complete").exists()
                assert dev.state().installed_version in (None, "1.0.0")

                await dev.start_agent()
                s = await dev.wait_state(
                    lambda s: s.installed_version == "2.0.0" and s.trial is None, timeout=90
                )
                said, _ = await answer(dev, "2.0.0")
                assert s.installed_version == "2.0.0"
                assert dev.link() == env_dir.name
                assert json.loads((env_dir / ".complete").read_text())["tool"] == "pip"
                assert said == f"2.0.0 alpha=1.0 prefix={env_prefix(dev)}"
            finally:
                await dev.stop_agents()
