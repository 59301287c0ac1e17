"""Issue 12, part 4: the sequence, visible. A real `fleetpush agent` installs a
release that carries a Python environment and migrates a real SQLite
database; an operator watching the real releaser sees every step, in the
order specs/PROTOCOL.md §7.6 gives; and a failing migration shows the roll
back before the old version starts again."""

from __future__ import annotations

import os
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from fleetpush.server.pyenv_publish import resolve_env
from fp_agent import AGENT_DEFAULTS, AgentDevice
from fp_data import MIGRATE_SRC, make_db
from fp_devices import DeviceDir
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, push, releaser
from fp_trees import app_release
from fp_wheels import make_wheel

from fleetpush.operator import connect as operator_connect

pytestmark = pytest.mark.slow
DB = "data/app.db"


class StepsDevice(AgentDevice):
    """dev-1 running env_app in its release's env, with a database as its data."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        settings = dict(
            AGENT_DEFAULTS,
            data_paths=[DB],
            migrate_command=["{python}", "migrate.py"],
            migrate_timeout=30,
        )
        DeviceDir.__init__(self, tmp_path, port, "env_app", "agent.log", settings, {})
        self.procs = []
        make_db(self.app_root / DB).close()

    def app_command(self) -> list[str]:
        return ["{python}", str(self.app_root / "app.py"), str(self.status)]


async def publish(handle: object, tmp_path: Path, version: str, migrate: str, schema: int) -> None:
    wheelhouse = tmp_path / f"wh-{version}"
    make_wheel(wheelhouse, "alpha", "1.0")
    env = resolve_env(tmp_path / f"work-{version}", wheelhouse=wheelhouse, imports=["alpha"])
    src = app_release(tmp_path, "env_app", version)
    (src / "migrate.py").write_text(MIGRATE_SRC)
    (src / "migrate.txt").write_text(migrate + "\n")
    await publish_and_approve(
        handle, tmp_path / "data", src, version, env=env, schema_version=schema  # type: ignore[arg-type]
    )


async def steps_until(op: object, version: str, last: str, events: object) -> list[str]:
    """The progress states of ``version`` the releaser relays, up to ``last``."""
    seen: list[str] = []
    async for e in events:  # type: ignore[attr-defined]
        if e.kind == "progress" and e.data.get("version") == version:
            state = e.data["state"]
            if state != "downloading" and (not seen or seen[-1] != state):
                seen.append(state)
            if state == last:
                return seen
    return seen


async def test_every_step_is_reported_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(150):
        async with releaser(data, heartbeat=5.0) as handle:
            await publish(handle, tmp_path, "2.0.0", "ok", 1)
            await publish(handle, tmp_path, "3.0.0", "fail", 2)
            dev = StepsDevice(tmp_path, handle.port)
            try:
                await dev.start_agent()
                await dev.wait_owner()
                async with (
                    operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op,
                    aclosing(op.watch()) as events,
                ):
                    await push(handle, "2.0.0")
                    seen = await steps_until(op, "2.0.0", "committed", events)
                    assert seen[seen.index("staged"):] == [
                        "staged", "applying", "preparing_env", "stopping", "backing_up",
                        "installing", "migrating", "starting", "trial", "committed",
                    ], seen
                    await push(handle, "3.0.0")
                    seen = await steps_until(op, "3.0.0", "failed", events)
                    assert seen[seen.index("staged"):] == [
                        "staged", "applying", "preparing_env", "stopping", "backing_up",
                        "installing", "migrating", "rolling_back", "failed",
                    ], seen
                state = await dev.wait_state(lambda s: s.is_bad("3.0.0"))
                assert state.installed_version == "2.0.0"
                # The env is 2.0.0's again (the migration ran in 3.0.0's).
                link = os.readlink(dev.state_dir / "envs" / "current")
                assert Path(link).name.startswith("2.0.0-"), link
                await dev.wait_owner()  # 2.0.0 runs again
            finally:
                await dev.stop_agents()
            # The restart of 2.0.0 after the failed 3.0.0 is reported too.
            assert "update starting 2.0.0" in dev.log.read_text()
