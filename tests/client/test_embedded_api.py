"""The names embedding apps expect (issue 11): ``enable_auto_update()``,
``disable_auto_update()`` and ``set_check_interval(s)`` on the Updater and on
its thread handle, beside ``set_auto_check``. Real releaser on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fleet_helpers import InProcessHost
from fleetpush.client.updater import Updater
from fleetpush.protocol.messages import UpdateProgress
from fp_devices import device_config
from fp_releaser import publish_and_approve, releaser
from fp_trees import make_release_dir


def test_updater_methods_switch_and_time_the_periodic_checks(tmp_path: Path) -> None:
    updater = Updater(device_config(tmp_path, 7878, auto_check=False, check_interval=60.0))
    assert not updater.auto_check
    updater.enable_auto_update()
    assert updater.auto_check and updater.check_interval == 60.0
    updater.set_check_interval(5)
    assert updater.auto_check and updater.check_interval == 5
    updater.disable_auto_update()
    assert not updater.auto_check and updater.check_interval == 5
    updater.set_check_interval(7.5)
    assert not updater.auto_check and updater.check_interval == 7.5  # still off
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            updater.set_check_interval(bad)
    assert updater.check_interval == 7.5 and not updater.auto_check
    updater.set_auto_check(True, 3)  # the older name still works
    assert updater.auto_check and updater.check_interval == 3


async def test_thread_handle_turns_auto_update_on_and_off(tmp_path: Path) -> None:
    states: list[str] = []

    def on_progress(msg: UpdateProgress) -> None:
        states.append(msg.state)

    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            src = make_release_dir(tmp_path / "rel-2.0", 32 * 1024)
            await publish_and_approve(handle, tmp_path / "data", src, "2.0")
            host = InProcessHost()
            updater = Updater(
                device_config(tmp_path / "device", handle.port, check_interval=3600.0),
                host=host,
                on_progress=on_progress,
            )
            thread = await trio.to_thread.run_sync(updater.start_in_thread)
            try:
                await trio.sleep(0.5)
                assert "checking" not in states  # auto_check = false: no check yet
                await trio.to_thread.run_sync(thread.set_check_interval, 0.2)
                await trio.sleep(0.6)
                assert "checking" not in states  # a new interval does not switch it on
                with pytest.raises(ValueError):
                    await trio.to_thread.run_sync(thread.set_check_interval, 0)

                await trio.to_thread.run_sync(thread.enable_auto_update)
                while host.applied != ["2.0"]:
                    await trio.sleep(0.05)

                await trio.to_thread.run_sync(thread.disable_auto_update)
                await trio.sleep(0.3)  # a check already under way may finish
                seen = states.count("checking")
                await trio.sleep(1.0)  # five intervals
                assert states.count("checking") == seen
            finally:
                await trio.to_thread.run_sync(thread.stop)
    assert updater.check_interval == 0.2 and not updater.auto_check
