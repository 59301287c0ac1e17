"""The whole chain with real processes: releaser, operator push, embedded updater,
re-exec apply mode, run mode, trial, commit or rollback. Versions are asked of the
app itself over TCP."""

from __future__ import annotations

import shutil
import subprocess
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from fleet_helpers import (
    RELEASE_KEY,
    app_release,
    ask_version,
    key_hex,
    read_status,
    running_releaser,
    write_agent_toml,
)
from fleetpush.client.state import load_state
from fleetpush.protocol.keys import private_key_from_seed
from fleetpush.server import ServerHandle, publish_release

from fleetpush.operator import connect as operator_connect

OPERATOR_KEY = private_key_from_seed(b"\x09" * 32)


def releaser(tmp_path: Path) -> AbstractAsyncContextManager[ServerHandle]:
    return running_releaser(tmp_path, OPERATOR_KEY)


async def publish(
    handle: ServerHandle,
    tmp_path: Path,
    version: str,
    behavior: str = "ok",
    kind: str = "embedded_app",
    approve: bool = True,
) -> None:
    src = app_release(tmp_path, kind, version, behavior)
    publish_release(tmp_path / "data", src, app="demo", version=version, signing_keys=[RELEASE_KEY])
    if approve:
        async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
            await op.approve("demo", version)


async def push(
    handle: ServerHandle, version: str, mode: str = "force", restart: bool = True
) -> None:
    async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
        await op.push(app="demo", version=version, mode=mode, restart=restart, devices=["dev-1"])


class Device:
    def __init__(self, tmp_path: Path, port: int, **settings: object) -> None:
        self.root = tmp_path / "device"
        self.app_root = self.root / "app"
        self.state_dir = self.root / "state"
        self.status = self.root / "status"
        self.log = self.root / "app.log"
        src = app_release(tmp_path / "v1", "embedded_app", "1.0.0")
        shutil.copytree(src, self.app_root)
        base: dict[str, object] = dict(
            server=f"127.0.0.1:{port}",
            app="demo",
            version="1.0.0",
            device_id="dev-1",
            state_dir=str(self.state_dir),
            app_root=str(self.app_root),
            trusted_keys=[key_hex(RELEASE_KEY)],
            auto_check=False,
            trial_seconds=15,
            backoff_initial=0.1,
            backoff_max=0.5,
        )
        base.update(settings)
        self.toml = write_agent_toml(self.root / "agent.toml", **base)
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

    def state(self):  # type: ignore[no-untyped-def]
        return load_state(self.state_dir)

    async def wait_state(self, pred, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        with trio.fail_after(timeout):
            while True:
                s = self.state()
                if pred(s):
                    return s
                await trio.sleep(0.1)


@pytest.fixture
def device_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "app.log"
    if log.exists():
        print(log.read_text()[-4000:])


@pytest.mark.slow
async def test_push_v2_reexec_apply_run_mode_commit(tmp_path: Path, device_log: None) -> None:
    with trio.fail_after(60):
        async with releaser(tmp_path) as handle:
            await publish(handle, tmp_path, "2.0.0")
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
        async with releaser(tmp_path) as handle:
            await publish(handle, tmp_path, "3.0.0", "noconfirm")
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
