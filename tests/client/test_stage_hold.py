"""Stage means stage (issue 11, item 5): a release staged by an operator's
``push --stage`` waits for ``apply``; periodic checks and a restarted updater
never apply it. Real releaser (fleetpush.server.serve) on 127.0.0.1 port 0,
a real Updater with periodic checks every 0.2 s, real files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio
from fleet_helpers import InProcessHost
from fleetpush.client.state import DeviceState, load_state
from fleetpush.client.updater import Updater
from fleetpush.server import ServerHandle
from fp_devices import device_config
from fp_keys import OPERATOR_KEY
from fp_releaser import approve, publish, publish_and_approve, releaser
from fp_trees import make_release_dir

from fleetpush.operator import connect as operator_connect

T = TypeVar("T")
INTERVAL = 0.2


async def wait_for(pred: Callable[[], T | None], timeout: float = 20.0) -> T:
    with trio.fail_after(timeout):
        while not (result := pred()):
            await trio.sleep(0.05)
        return result


async def push(handle: ServerHandle, mode: str) -> None:
    async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
        while not any(d.connected for d in await op.list_devices(app="demo")):
            await trio.sleep(0.05)
        await op.push(app="demo", version="2.0", mode=mode, devices=["dev-1"])


def staged(state_dir: Path) -> DeviceState | None:
    s = load_state(state_dir)
    return s if s.staged is not None else None


async def test_staged_release_waits_for_apply_despite_periodic_checks(tmp_path: Path) -> None:
    device = tmp_path / "device"
    state_dir = device / "state"
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            config = device_config(device, handle.port, auto_check=True, check_interval=INTERVAL)
            # Pre-released: not offered to this stable device until approved below.
            src = make_release_dir(tmp_path / "rel-2.0", 64 * 1024)
            publish(tmp_path / "data", src, "2.0")
            async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                await op.set_release_status("demo", "2.0", "pre-released")
            host = InProcessHost()
            updater = Updater(config, host=host)
            async with trio.open_nursery() as nursery:
                await nursery.start(updater.run)
                await push(handle, "stage")
                s = await wait_for(lambda: staged(state_dir))
                assert s.staged is not None and s.staged.held and not s.staged.restart
                await approve(handle, "2.0")  # now every periodic check finds 2.0
                checks = updater.session.connects
                await trio.sleep(10 * INTERVAL)  # several periodic checks find 2.0
                nursery.cancel_scope.cancel()
            s = load_state(state_dir)
            assert host.applied == []
            assert s.installed_version == "1.0"
            assert s.staged is not None and s.staged.version == "2.0" and s.staged.held
            assert updater.last_info is not None, "no periodic check ran"
            assert not updater.last_info.available
            assert "held" in updater.last_info.reason
            assert updater.session.connects == checks  # the same session all along

            # A restarted updater does not apply it at start either.
            host = InProcessHost()
            again = Updater(config, host=host)
            async with trio.open_nursery() as nursery:
                await nursery.start(again.run)
                await wait_for(lambda: again.session.connected)
                await trio.sleep(5 * INTERVAL)
                assert host.applied == []
                assert load_state(state_dir).installed_version == "1.0"

                # The operator's apply does.
                await push(handle, "apply")
                s = await wait_for(
                    lambda: (st := load_state(state_dir)).installed_version == "2.0" and st
                )
                nursery.cancel_scope.cancel()
    assert host.applied == ["2.0"]
    assert s.staged is None


async def test_a_check_finds_a_held_release_not_available(tmp_path: Path) -> None:
    """`fleetpush update` without --to (a check) leaves a held release for the operator."""
    device = tmp_path / "device"
    state_dir = device / "state"
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            src = make_release_dir(tmp_path / "rel-2.0", 64 * 1024)
            await publish_and_approve(handle, tmp_path / "data", src, "2.0")
            host = InProcessHost()
            updater = Updater(device_config(device, handle.port), host=host)
            async with trio.open_nursery() as nursery:
                await nursery.start(updater.run)
                await push(handle, "stage")
                await wait_for(lambda: staged(state_dir))
                info = await updater.check()
                nursery.cancel_scope.cancel()
    assert not info.available and info.offered == "2.0"
    assert info.reason.startswith("2.0 is staged and held")
    assert host.applied == []
