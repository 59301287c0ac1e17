"""The whole chain with real processes: releaser, operator push, embedded updater,
re-exec apply mode, run mode, trial, commit or rollback. Versions are asked of the
app itself over TCP."""

from __future__ import annotations

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


class Device(DeviceDir):
    def __init__(self, tmp_path: Path, port: int, **settings: object) -> None:
        super().__init__(
            tmp_path, port, "embedded_app", "app.log", dict(trial_seconds=15), settings
        )
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, str(self.app_root / "app.py"), str(self.toml), str(self.status)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.root),
            )

    async def stop(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            with trio.move_on_after(5):
                await self.proc.wait()

    async def version(self, expect: str, timeout: float = 30.0) -> tuple[str, int]:
        port, _v, pid = await read_status(self.status, expect, timeout)
        return await ask_version(port), pid


@pytest.fixture
def device_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "app.log"
    if log.exists():
        print(log.read_text()[-4000:])


@pytest.mark.slow
async def test_push_v2_reexec_apply_run_mode_commit(tmp_path: Path, device_log: None) -> None:
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            v2 = app_release(tmp_path, "embedded_app", "2.0.0")
            await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0")
            dev = Device(tmp_path, handle.port)
            await dev.start()
            try:
                assert (await dev.version("1.0.0"))[0] == "1.0.0"
                pid1 = (await read_status(dev.status, "1.0.0"))[2]
                await dev.wait_state(lambda s: s.history == ())  # connected and flushed
                await push(handle, "2.0.0")
                answer, pid2 = await dev.version("2.0.0")
                assert answer == "2.0.0"
                assert pid2 == pid1  # os.execv: the service manager keeps the same process
                s = await dev.wait_state(
                    lambda s: s.trial is None and s.installed_version == "2.0.0"
                )
                assert s.installed_sequence >= 1 and s.high_water == s.installed_sequence
                # the outcome reached the releaser (history flushed and acknowledged)
                await dev.wait_state(lambda s: not s.history)
                async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                    (info,) = await op.list_devices(app="demo")
                assert info.version == "2.0.0"
            finally:
                await dev.stop()


@pytest.mark.slow
async def test_never_confirming_v3_rolls_back_at_end_of_trial(
    tmp_path: Path, device_log: None
) -> None:
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            v3 = app_release(tmp_path, "embedded_app", "3.0.0", "noconfirm")
            await publish_and_approve(handle, tmp_path / "data", v3, "3.0.0")
            dev = Device(tmp_path, handle.port, trial_seconds=3)
            await dev.start()
            try:
                await dev.version("1.0.0")
                await push(handle, "3.0.0")
                assert (await dev.version("3.0.0"))[0] == "3.0.0"
                s = await dev.wait_state(lambda s: "3.0.0" in s.bad_releases)
                assert s.installed_version == "1.0.0"
                # the restored version runs again (the app answers, not the bookkeeping)
                dev.status.unlink()
                assert (await dev.version("1.0.0"))[0] == "1.0.0"
                async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                    (info,) = await op.list_devices(app="demo")
                assert info.version == "1.0.0"
            finally:
                await dev.stop()


async def test_releaser_unreachable_app_keeps_running(tmp_path: Path, device_log: None) -> None:
    with trio.fail_after(30):
        # a port nobody listens on
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        dev = Device(tmp_path, port)
        await dev.start()
        try:
            assert (await dev.version("1.0.0"))[0] == "1.0.0"
            await trio.sleep(1.0)  # several reconnect attempts with backoff
            port_app, _, _ = await read_status(dev.status)
            assert await ask_version(port_app) == "1.0.0"
            assert dev.proc is not None and dev.proc.returncode is None
        finally:
            await dev.stop()


@pytest.mark.slow
async def test_an_env_that_fails_its_smoke_check_never_stops_an_embedded_app(
    tmp_path: Path, device_log: None
) -> None:
    from fleetpush.server.pyenv_publish import resolve_env
    from fp_wheels import make_wheel

    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            make_wheel(tmp_path / "wh", "alpha", "1.0")
            env = resolve_env(tmp_path / "work", wheelhouse=tmp_path / "wh",
                              imports=["alpha", "missing_mod"])
            v2 = app_release(tmp_path, "embedded_app", "2.0.0")
            await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0", env=env)
            dev = Device(tmp_path, handle.port)
            await dev.start()
            try:
                _, pid1 = await dev.version("1.0.0")
                await dev.wait_state(lambda s: s.history == ())
                await push(handle, "2.0.0")
                s = await dev.wait_state(lambda s: "2.0.0" in s.bad_releases)
                assert s.installed_version in (None, "1.0.0")
                answer, pid = await dev.version("1.0.0")
                assert (answer, pid) == ("1.0.0", pid1)  # never re-exec'd
                async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                    with trio.fail_after(30):
                        while True:
                            (info,) = await op.list_devices(app="demo")
                            if (info.last_result or {}).get("version") == "2.0.0":
                                break
                            await trio.sleep(0.2)
                assert info.last_result is not None
                assert info.last_result["state"] == "failed"
                assert info.last_result["error"] == (
                    "environment: smoke check failed: "
                    "ModuleNotFoundError: No module named 'missing_mod'"
                )
                assert not (dev.state_dir / "envs" / "current").exists()
            finally:
                await dev.stop()
