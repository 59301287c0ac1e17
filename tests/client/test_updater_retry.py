"""A pushed update survives a kill mid-download: it is persisted as
``extra["pending_push"]`` and resumed (staged chunks kept) once the restarted
updater is connected; the attempts are bounded by ``max_download_attempts``.
Real releaser (fleetpush.server.serve) on 127.0.0.1 port 0, real files."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio
from fleet_helpers import InProcessHost
from fleetpush.client.state import load_state, update_state
from fleetpush.client.updater import PENDING_PUSH, Updater, pending_push
from fleetpush.protocol.messages import UpdateProgress
from fleetpush.server import ServerHandle
from fp_devices import device_config
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, releaser
from fp_trees import make_release_dir

from fleetpush.operator import connect as operator_connect

CHUNK = 16 * 1024
SIZE = 1024 * 1024


async def publish_v2(handle: ServerHandle, tmp_path: Path) -> None:
    # Two files of bytes that never repeat: no chunk can be reused from another.
    src = make_release_dir(tmp_path / "rel-2.0", SIZE)
    await publish_and_approve(handle, tmp_path / "data", src, "2.0", chunk_size=CHUNK)


async def wait_for(pred, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not (result := pred()):
            await trio.sleep(0.05)
        return result


async def test_pushed_download_killed_midway_resumes_after_restart(tmp_path: Path) -> None:
    device = tmp_path / "device"
    state_dir = device / "state"
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            await publish_v2(handle, tmp_path)
            # First life: the push arrives, the download is slow, the process dies.
            midway = trio.Event()

            def on_progress(msg: UpdateProgress) -> None:
                if msg.state == "downloading" and 0 < msg.bytes_done < msg.bytes_total:
                    midway.set()

            first = Updater(
                device_config(device, handle.port, max_download_rate=SIZE / 2),
                host=InProcessHost(),
                on_progress=on_progress,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(first.run)
                await wait_for(lambda: first.session.connected)
                async with operator_connect(
                    ("127.0.0.1", handle.port), OPERATOR_KEY, name="ops"
                ) as op:
                    while not any(d.connected for d in await op.list_devices(app="demo")):
                        await trio.sleep(0.05)
                    await op.push(app="demo", version="2.0", mode="stage", devices=["dev-1"])
                await midway.wait()
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()  # the "kill": nothing more is written
            s = load_state(state_dir)
            assert s.staged is None
            pending = pending_push(s)
            assert pending is not None
            assert pending["version"] == "2.0" and pending["push_id"]
            assert pending["restart"] is False and pending["attempts"] == 1

            # Second life: no operator action; resumed once connected.
            second = Updater(device_config(device, handle.port), host=InProcessHost())
            async with trio.open_nursery() as nursery:
                await nursery.start(second.run)
                # The state says staged a moment before the updater's stage step
                # returns with its download result: wait for both.
                s = await wait_for(
                    lambda: second.last_download is not None
                    and (st := load_state(state_dir)).staged
                    and st
                )
                nursery.cancel_scope.cancel()
    assert s.staged.version == "2.0"
    assert s.staged.push_id == pending["push_id"]
    assert s.staged.restart is False
    assert PENDING_PUSH not in s.extra
    assert s.installed_version == "1.0"  # stage mode: downloaded only
    result = second.last_download
    assert result is not None and result.chunks_resumed > 0
    assert result.chunks_fetched < SIZE // CHUNK


async def test_pending_push_past_its_attempts_is_reported_failed_and_dropped(
    tmp_path: Path,
) -> None:
    device = tmp_path / "device"
    state_dir = device / "state"
    seen: list[UpdateProgress] = []
    with trio.fail_after(30):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            await publish_v2(handle, tmp_path)
            config = device_config(device, handle.port, max_download_attempts=2)
            pending = {
                "version": "2.0",
                "push_id": "p-1",
                "restart": False,
                "forced": True,
                "attempts": 2,  # the last one was cut by a kill
            }
            update_state(state_dir, lambda s: attrs.evolve(s, extra={PENDING_PUSH: pending}))
            updater = Updater(config, host=InProcessHost(), on_progress=seen.append)
            async with trio.open_nursery() as nursery:
                await nursery.start(updater.run)
                await wait_for(lambda: pending_push(load_state(state_dir)) is None)
                await wait_for(lambda: any(m.state == "failed" for m in seen))
                nursery.cancel_scope.cancel()
    s = load_state(state_dir)
    assert s.staged is None
    (failed,) = [m for m in seen if m.state == "failed"]
    assert failed.version == "2.0" and failed.push_id == "p-1"
    assert "2 download attempts" in (failed.error or "")
