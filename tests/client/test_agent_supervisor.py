"""``fleetpush agent`` as a real process over a real releaser: update between stop
and start, crash during trial -> automatic rollback, auto-restart, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from fleet_helpers import ask_version, read_status
from fp_devices import DeviceDir
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, push, releaser
from fp_trees import app_release

from fleetpush.operator import connect as operator_connect

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))


class AgentDevice(DeviceDir):
    def __init__(self, tmp_path: Path, port: int, **settings: object) -> None:
        defaults: dict[str, object] = dict(
            trial_seconds=10,
            confirm_after=1.5,
            restart_backoff_initial=0.1,
            restart_backoff_max=0.5,
            stop_timeout=3,
            status_interval=1,
        )
        super().__init__(tmp_path, port, "plain_app", "agent.log", defaults, settings)
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await trio.lowlevel.open_process(
                [
                    FLEETPUSH,
                    "-v",
                    "agent",
                    "--config",
                    str(self.toml),
                    "--",
                    sys.executable,
                    str(self.app_root / "app.py"),
                    str(self.status),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.root),
            )

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-6000:])


@pytest.mark.slow
async def test_agent_updates_then_rolls_back_a_crashing_release(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(90):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            data = tmp_path / "data"
            v2 = app_release(tmp_path, "plain_app", "2.0.0")
            await publish_and_approve(handle, data, v2, "2.0.0")
            v3 = app_release(tmp_path, "plain_app", "3.0.0", "crash")
            await publish_and_approve(handle, data, v3, "3.0.0")
            dev = AgentDevice(tmp_path, handle.port)
            await dev.start()
            try:
                port, _, pid1 = await read_status(dev.status, "1.0.0")
                assert await ask_version(port) == "1.0.0"
                await dev.wait_state(lambda s: s.history == ())
                # v1 -> v2: stop the child, install, start it again, commit after confirm_after
                await push(handle, "2.0.0")
                port, _, pid2 = await read_status(dev.status, "2.0.0")
                assert pid2 != pid1
                assert await ask_version(port) == "2.0.0"
                await dev.wait_state(lambda s: s.installed_version == "2.0.0" and s.trial is None)
                # v3 crashes on start: rolled back to v2 automatically and reported
                await push(handle, "3.0.0")
                s = await dev.wait_state(lambda s: "3.0.0" in s.bad_releases and s.trial is None)
                assert s.installed_version == "2.0.0"
                # The rolled-back 2.0.0 is a new process (it may already have
                # written its status, so wait for its pid rather than a rewrite).
                port, _, _ = await read_status(dev.status, "2.0.0", not_pid=pid2)
                assert await ask_version(port) == "2.0.0"
                await dev.wait_state(lambda s: s.history == ())  # failure flushed to the releaser
                async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                    (info,) = await op.list_devices(app="demo")
                assert info.version == "2.0.0"
                assert info.app_status is not None and info.app_status.get("state") == "running"
            finally:
                code = await dev.stop()
            assert code == 0
            # no orphan: the app the agent ran is gone with it
            with pytest.raises(ProcessLookupError):
                os.kill(int(dev.status.read_text().split()[2]), 0)


async def test_agent_restarts_a_dying_app_with_backoff(tmp_path: Path, agent_log: None) -> None:
    with trio.fail_after(30):
        dev = AgentDevice(tmp_path, 9)  # releaser unreachable: the app runs anyway
        await dev.start()
        try:
            port, _, pid1 = await read_status(dev.status, "1.0.0")
            os.kill(pid1, signal.SIGKILL)
            dev.status.unlink()
            port, _, pid2 = await read_status(dev.status, "1.0.0")
            assert pid2 != pid1
            assert await ask_version(port) == "1.0.0"
        finally:
            assert await dev.stop() == 0
