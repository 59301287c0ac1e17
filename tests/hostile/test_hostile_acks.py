"""Nothing acknowledged is ever lost (issue 10, items 10 and 11).

Real device processes (tests/apps/embedded_app, restarted like a service
manager would, see test_hostile_kill_matrix.py) against a real releaser,
killed with SIGKILL at the exact point:

* item 10: the device dies right after acknowledging ``__force_update__``
  (crash point ``push-after-ack``, client/journal.py). The push was persisted
  before the ack, and the releaser offers an accepted but unfinished push again
  when the device reconnects: the update completes, downloaded once. A device
  that lost the push anyway (as one that acked before persisting did) gets it
  again from the releaser.
* item 11: the releaser (a ``fleetpush server`` process) dies right after the
  device's ``committed`` report left the device's history; restarted on the
  same data dir it has the row, and lists the device on the version it runs.
  Re-sent reports are ignored; an older releaser gets the old notifications.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import attrs
import pytest
import trio
from faultproxy import FaultProxy, Faults
from fleetpush.client.forced_push import pending_push, with_pending
from fleetpush.client.state import DeviceState, load_state, update_state
from fleetpush.client.updater import Updater
from fleetpush.server import ServerHandle
from fleetpush.server import session as server_session
from fp_devices import device_config
from fp_keys import OPERATOR_KEY, key_hex
from fp_releaser import publish, publish_and_approve, releaser, start_releaser_process
from test_hostile_kill_matrix import BLOB, Device, release_dir, settle, wait_connected, wait_for

from fleetpush.operator import connect as operator_connect

pytestmark = pytest.mark.slow


async def push_force(port: int, version: str) -> str:
    """Push ``version`` to dev-1 as the operator; returns the push id."""
    async with operator_connect(("127.0.0.1", port), OPERATOR_KEY, name="ops") as op:
        result = await op.push(app="demo", version=version, mode="force", devices=["dev-1"])
    return str(result.push_id)


# --- item 10: a pushed update acknowledged, then lost --------------------------------------


async def test_a_device_killed_right_after_its_ack_completes_the_push(tmp_path: Path) -> None:
    v1 = release_dir(tmp_path, "1.0.0", "ok")
    v2 = release_dir(tmp_path, "2.0.0", "ok")
    with trio.fail_after(90):
        async with (
            releaser(tmp_path / "data", heartbeat=5.0) as handle,
            trio.open_nursery() as nursery,
        ):
            await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0")
            proxy = FaultProxy(handle.port, Faults())
            await nursery.start(proxy.run)
            dev = Device(tmp_path, proxy.port, v1)
            dev.crash_at = "push-after-ack"
            dev.start()
            try:
                nursery.start_soon(dev.supervise)
                await wait_for(lambda: dev.status.exists(), 20, "v1 running")
                await wait_connected(handle)
                start = proxy.bytes_down
                push_id = await push_force(handle.port, "2.0.0")
                await wait_for(lambda: dev.killed, 20, "SIGKILL right after the ack")
                assert handle.services.pushes.deliveries(push_id)["dev-1"][0] == "accepted"
                version = await settle(dev, handle)
                assert version == "2.0.0"
                # Resumed by the device and offered again by the releaser, but
                # downloaded once: the repeated command was acknowledged as held.
                assert proxy.bytes_down - start < 2 * BLOB
                state, _, result = handle.services.pushes.deliveries(push_id)["dev-1"]
                assert (state, result) == ("accepted", "committed")
            finally:
                nursery.cancel_scope.cancel()
                dev.stop()


async def test_the_releaser_offers_an_accepted_push_again_to_a_device_that_lost_it(
    tmp_path: Path,
) -> None:
    v1 = release_dir(tmp_path, "1.0.0", "ok")
    v2 = release_dir(tmp_path, "2.0.0", "ok")
    with trio.fail_after(90):
        async with (
            releaser(tmp_path / "data", heartbeat=5.0) as handle,
            trio.open_nursery() as nursery,
        ):
            await publish_and_approve(handle, tmp_path / "data", v2, "2.0.0")
            dev = Device(tmp_path, handle.port, v1)
            dev.crash_at = "push-after-ack"
            dev.start()
            try:
                await wait_for(lambda: dev.status.exists(), 20, "v1 running")
                await wait_connected(handle)
                push_id = await push_force(handle.port, "2.0.0")
                assert dev.proc is not None
                await wait_for(lambda: dev.proc is not None and dev.proc.poll() is not None, 20, "")
                assert dev.proc.returncode == -signal.SIGKILL
                dev.killed = True
                # What a device that acknowledged before persisting was left with.
                assert pending_push(dev.state()) is not None
                update_state(dev.state_dir, lambda s: with_pending(s, None))
                assert pending_push(dev.state()) is None
                dev.start()
                nursery.start_soon(dev.supervise)
                assert await settle(dev, handle) == "2.0.0"
                state, _, result = handle.services.pushes.deliveries(push_id)["dev-1"]
                assert (state, result) == ("accepted", "committed")
            finally:
                nursery.cancel_scope.cancel()
                dev.stop()


# --- item 11: outcome reports lost -----------------------------------------------------------


def start_releaser(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """A ``fleetpush server`` process on 127.0.0.1 (plain TCP: this test is about
    durability, and the test devices and console speak plain TCP)."""
    return start_releaser_process(
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--operator-key", key_hex(OPERATOR_KEY), "--heartbeat", "5", "--insecure",
    )  # fmt: skip


def _result(handle: ServerHandle) -> tuple[object, object]:
    """(state, version) of dev-1's stored last_result (an object, specs/PROTOCOL.md §7.9)."""
    row = handle.services.devices.require("dev-1")
    doc = json.loads(row["last_result"]) if row["last_result"] else {}
    return doc.get("state"), doc.get("version")


def reported(s: DeviceState) -> bool:
    """The device runs 2.0.0, committed, and its history no longer holds the outcome."""
    return (
        s.installed_version == "2.0.0"
        and s.trial is None
        and s.last_result is not None
        and s.last_result.get("state") == "committed"
        and not any(h.get("state") == "committed" for h in s.history)
    )


async def test_a_releaser_killed_right_after_a_report_keeps_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    v1 = release_dir(tmp_path, "1.0.0", "ok")
    v2 = release_dir(tmp_path, "2.0.0", "ok")
    publish(data, v2, "2.0.0", approved=True)
    proc, port = start_releaser(data)
    dev = Device(tmp_path, port, v1)
    try:
        with trio.fail_after(90):
            dev.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev.supervise)
                await wait_for(lambda: dev.status.exists(), 20, "v1 running")
                # The device runs its app before its link is up: push once the
                # releaser lists it (a push naming an unknown device is refused).
                with trio.fail_after(20):
                    async with operator_connect(("127.0.0.1", port), OPERATOR_KEY) as op:
                        while not any(d.connected for d in await op.list_devices(app="demo")):
                            await trio.sleep(0.1)
                await push_force(port, "2.0.0")
                # The moment the device deleted the committed entry (it counts
                # as delivered), the releaser dies; the device dies too, so its
                # next hello cannot repair what the releaser lost.
                while not reported(load_state(dev.state_dir)):
                    await trio.sleep(0.002)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                nursery.cancel_scope.cancel()
            dev.stop()
            proc2, port2 = start_releaser(data)
            try:
                async with operator_connect(("127.0.0.1", port2), OPERATOR_KEY, name="o") as op:
                    (info,) = await op.list_devices(app="demo")
                assert info.version == "2.0.0" and info.last_result is not None
                assert (info.last_result["state"], info.last_result["version"]) == (
                    "committed",
                    "2.0.0",
                )
            finally:
                proc2.kill()
                proc2.wait(10)
                assert proc2.stdout is not None
                proc2.stdout.close()
    finally:
        dev.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_reports_sent_again_are_ignored_and_old_releasers_get_notifications(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(30):
        async with releaser(tmp_path / "data") as handle:
            config = device_config(tmp_path / "device", handle.port)
            updater = Updater(config)
            s = update_state(config.state_dir, lambda s: s.record(1234.5, "committed", "1.1"))
            entry = s.history[-1]
            async with updater.connected():
                await updater.ctx.link.wait_connected(10)
                # The second time as if the releaser's answer to the first was lost.
                for _ in range(2):
                    update_state(config.state_dir, lambda s: attrs.evolve(s, history=(entry,)))
                    await updater._reporter.flush_history()
                    assert load_state(config.state_dir).history == ()
                rows = [
                    e
                    for e in handle.services.events.history(100, "dev-1")
                    if e.kind == "progress" and e.data.get("state") == "committed"
                ]
                assert len(rows) == 1, rows
                assert _result(handle) == ("committed", "1.1")
            # An older releaser (no report_outcomes): the old notifications, so
            # newer devices keep working with it.
            monkeypatch.delitem(server_session.ROUTES, "report_outcomes")
            update_state(config.state_dir, lambda s: s.record(1300.0, "rolled-back", "1.2"))
            async with updater.connected():
                await updater.ctx.link.wait_connected(10)
                await updater._reporter.flush_history()
                assert load_state(config.state_dir).history == ()
                await wait_for(
                    lambda: _result(handle) == ("rolled_back", "1.2"),
                    10,
                    "notified",
                )
