"""Pushes: online, offline, across a restart, stage then apply; watch events."""

from __future__ import annotations

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import ErrorCode, RpcError
from fleetpush.protocol.messages import (
    Empty,
    Push,
    SetReleaseStatus,
    UpdateProgress,
    Watch,
)
from fleetpush.server import ReleaseStore
from fp_releaser import running_releaser
from server_helpers import connect, publish, wait_for


def _approve(data_dir, version, status="approved"):
    store = ReleaseStore.open(data_dir)
    store.set_status("demo", version, "pre-released", "t")
    if status == "approved":
        store.set_status("demo", version, "approved", "t")
    store.close()


async def test_push_online_offline_and_after_restart(config, data_dir, tmp_path, operator_key):
    publish(data_dir, tmp_path, "1.1", restart=False)
    _approve(data_dir, "1.1")
    keys = {d: Ed25519PrivateKey.generate() for d in ("on-1", "off-1")}
    with trio.fail_after(20):
        async with running_releaser(config) as server:
            # both devices are known; only on-1 stays connected
            async with connect(server.port, keys["off-1"], peer_id="off-1"):
                pass
            async with (
                connect(server.port, keys["on-1"], peer_id="on-1") as dev,
                connect(server.port, operator_key, role="operator", peer_id="ops") as op,
            ):
                result = await op.request(
                    "push", Push(app="demo", version="1.1", mode="force", all=True)
                )
                assert sorted(result.targets) == ["off-1", "on-1"]
                assert (result.sent, result.queued) == (["on-1"], ["off-1"])
                await wait_for(lambda: dev.commands)
                method, cmd = dev.commands[0]
                assert method == "__force_update__"
                # restart=None takes the manifest's default (published with restart=False)
                assert (cmd.version, cmd.restart, cmd.push_id) == ("1.1", False, result.push_id)
                pushes = server.services.pushes
                deliveries = pushes.deliveries(result.push_id)
                await wait_for(lambda: pushes.deliveries(result.push_id)["on-1"][0] == "accepted")
                assert deliveries["off-1"][0] == "queued"
        # a restart of the releaser does not lose the queued push
        async with running_releaser(config) as server:
            async with connect(server.port, keys["off-1"], peer_id="off-1") as dev:
                await wait_for(lambda: dev.commands)
                assert dev.commands[0][0] == "__force_update__"
                assert dev.commands[0][1].version == "1.1"
                push_id = dev.commands[0][1].push_id
            # accepted but unfinished (no outcome reported yet): offered again (§7.4)
            async with connect(server.port, keys["off-1"], peer_id="off-1") as dev:
                await wait_for(lambda: dev.commands)
                assert dev.commands[0][1].push_id == push_id
                await dev.peer.notify(
                    "update_progress",
                    UpdateProgress(state="staged", app="demo", version="1.1", push_id=push_id),
                )
                await wait_for(
                    lambda: server.services.pushes.deliveries(push_id)["off-1"][2] == "staged"
                )
            # delivered once finished (staged: it was pushed with restart=False):
            # a reconnect gets nothing more
            async with connect(server.port, keys["off-1"], peer_id="off-1") as dev:
                await trio.sleep(0.2)
                assert dev.commands == []


async def test_stage_then_apply(config, data_dir, tmp_path, operator_key):
    publish(data_dir, tmp_path, "1.1")
    _approve(data_dir, "1.1", "pre-released")  # pushes may use pre-released releases
    with trio.fail_after(20):
        async with (
            running_releaser(config) as server,
            connect(server.port, peer_id="d1", group="lab") as d1,
            connect(server.port, peer_id="d2", group="lab") as d2,
            connect(server.port, operator_key, role="operator", peer_id="ops") as op,
        ):
            r = await op.request(
                "push", Push(app="demo", version="1.1", mode="stage", group="lab", restart=True)
            )
            assert sorted(r.sent) == ["d1", "d2"]
            await wait_for(lambda: d1.commands and d2.commands)
            assert d1.commands[0][0] == "__force_update__"
            assert d1.commands[0][1].restart is False  # stage: download only
            # d1 (on the stable channel) may fetch the pushed pre-release
            files = await d1.download("demo", "1.1")
            assert files == {"app.txt": b"demo 1.1"}
            await d1.peer.notify(
                "update_progress",
                UpdateProgress(state="staged", app="demo", version="1.1", push_id=r.push_id),
            )
            await wait_for(lambda: server.services.devices.get("d1")["staged_version"] == "1.1")
            r = await op.request(
                "push", Push(app="demo", version="1.1", mode="apply", group="lab", restart=True)
            )
            assert r.targets == ["d1"]  # only the device that staged it
            await wait_for(lambda: len(d1.commands) == 2)
            method, cmd = d1.commands[1]
            assert (method, cmd.restart) == ("__apply_update__", True)
            await d1.peer.notify(
                "update_progress",
                UpdateProgress(state="committed", app="demo", version="1.1", push_id=r.push_id),
            )
            await wait_for(lambda: server.services.devices.get("d1")["version"] == "1.1")
            status = await op.request("status", Empty())
            assert status.by_version == {"1.1": 1, "1.0": 1}
            assert status.connected == 2


async def test_push_refuses_drafts_and_revoked(config, data_dir, tmp_path, operator_key):
    publish(data_dir, tmp_path, "1.1")
    with trio.fail_after(10):
        async with (
            running_releaser(config) as server,
            connect(server.port, peer_id="d1"),
            connect(server.port, operator_key, role="operator", peer_id="ops") as op,
        ):
            with pytest.raises(RpcError) as e:
                await op.request("push", Push(app="demo", version="1.1", mode="force", all=True))
            assert e.value.code == ErrorCode.CONFLICT
            with pytest.raises(RpcError) as e:
                await op.request("push", Push(app="demo", version="9.9", mode="force", all=True))
            assert e.value.code == ErrorCode.NOT_FOUND
            await op.request(
                "set_release_status",
                SetReleaseStatus(app="demo", version="1.1", status="revoked"),
            )
            with pytest.raises(RpcError) as e:
                await op.request(
                    "set_release_status",
                    SetReleaseStatus(app="demo", version="1.1", status="approved"),
                )
            assert e.value.code == ErrorCode.CONFLICT


async def test_watch_relays_progress_and_pushes(config, data_dir, tmp_path, operator_key):
    publish(data_dir, tmp_path, "1.1")
    _approve(data_dir, "1.1")
    events = []
    with trio.fail_after(10):
        async with (
            running_releaser(config) as server,
            connect(server.port, operator_key, role="operator", peer_id="ops") as op,
        ):
            original = op.peer._on_notification

            async def on_note(peer, ev):
                events.append(ev.params)

            op.peer._on_notification = on_note
            assert original is None
            await op.request("watch", Watch(history=10))
            async with connect(server.port, peer_id="d1") as dev:
                await op.request(
                    "push", Push(app="demo", version="1.1", mode="force", devices=["d1"])
                )
                await wait_for(lambda: dev.commands)
                await dev.peer.notify(
                    "update_progress",
                    UpdateProgress(
                        state="downloading",
                        app="demo",
                        version="1.1",
                        bytes_done=5,
                        bytes_total=10,
                    ),
                )
                await wait_for(lambda: any(e.kind == "progress" for e in events))
            await wait_for(lambda: any(e.kind == "disconnected" for e in events))
    kinds = [e.kind for e in events]
    for kind in ("connected", "push", "command_sent", "command_result", "progress", "disconnected"):
        assert kind in kinds
    progress = next(e for e in events if e.kind == "progress")
    assert progress.device_id == "d1" and progress.data["bytes_done"] == 5


async def test_a_slow_watcher_loses_events_not_memory(data_dir):
    from fleetpush.server.db import open_database
    from fleetpush.server.events import EventHub

    conn = open_database(data_dir)
    try:
        hub = EventHub(conn, history_limit=1000, queue_size=3)
        watcher = hub.subscribe()
        for i in range(10):
            hub.emit("progress", f"d{i}")
        got = [watcher.take_nowait().device_id for _ in range(3)]
        assert got == ["d0", "d1", "d2"]
        dropped = watcher.take_dropped()
        assert dropped is not None and dropped.kind == "dropped" and dropped.data == {"count": 7}
        assert watcher.take_dropped() is None
        assert [e.device_id for e in hub.history(2)] == ["d8", "d9"]  # the history has them all
        watcher.close()
        assert hub.watchers == 0
    finally:
        conn.close()
