"""Trust rules and policy of the Updater, in-process against a tiny releaser: untrusted
key, rollback attack (also after a restart), path traversal, busy app deferral."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from fleet_helpers import InProcessHost, MiniReleaser, build_release
from fleetpush.client import Updater
from fleetpush.client.state import load_state
from fleetpush.protocol import codec
from fleetpush.protocol.errors import BadPath, RollbackRefused, UnknownKey
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.manifest import sign_manifest
from fleetpush.protocol.messages import UpdateCommand
from fp_devices import device_config
from fp_keys import OTHER_KEY, RELEASE_KEY
from fp_trees import make_tree


@pytest.fixture
async def releaser(nursery: trio.Nursery) -> MiniReleaser:
    r = MiniReleaser()
    await nursery.start(r.serve)
    return r


def offer(r: MiniReleaser, tmp: Path, version: str, sequence: int, key=RELEASE_KEY, **kw):  # type: ignore[no-untyped-def]
    src = make_tree(tmp / f"src-{version}", {"app.txt": f"demo {version}\n".encode()})
    signed, m = build_release(src, app="demo", version=version, sequence=sequence, keys=[key], **kw)
    r.add(src, signed, m)
    r.offer = version
    return m


async def test_manifest_signed_by_untrusted_key_is_refused(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    offer(releaser, tmp_path, "2.0", 2, key=OTHER_KEY)
    host = InProcessHost()
    updater = Updater(device_config(tmp_path, releaser.port), host=host)
    with trio.fail_after(10):
        async with updater.connected():
            with pytest.raises(UnknownKey):
                await updater.update()
    assert host.applied == []
    assert not (tmp_path / "state" / "updates").exists()  # nothing written
    assert load_state(tmp_path / "state").high_water == 0
    assert releaser.chunks_served == []
    assert any(p.state == "failed" for p in releaser.progress)  # type: ignore[attr-defined]


async def test_lower_sequence_refused_also_after_restart(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    offer(releaser, tmp_path, "5.0", 5)
    host = InProcessHost()
    cfg = device_config(tmp_path, releaser.port)
    with trio.fail_after(20):
        async with Updater(cfg, host=host).connected() as updater:
            await updater.update()
        assert host.applied == ["5.0"]
        assert load_state(cfg.state_dir).high_water == 5
        # an attacker (or a confused releaser) replays an older, validly signed release
        offer(releaser, tmp_path, "4.0", 4)
        async with Updater(cfg, host=host).connected() as fresh:  # a restart: state from disk
            with pytest.raises(RollbackRefused):
                await fresh.update()
            with pytest.raises(RollbackRefused):
                await fresh.update("4.0", forced=True)  # what a push does
    assert host.applied == ["5.0"]
    assert (cfg.app_root / "app.txt").read_text() == "demo 5.0\n"


async def test_path_traversal_in_manifest_never_writes_outside(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    m = offer(releaser, tmp_path, "2.0", 2)
    data = b"pwned\n"
    d = digest("sha256", data)
    raw = codec.to_wire(m)
    raw["files"] = [
        {"path": "../outside.txt", "size": len(data), "mode": 0o644, "digest": d, "chunks": [d]}
    ]
    releaser.releases["2.0"] = (sign_manifest(codec.packb(raw), [RELEASE_KEY]), m, tmp_path)
    host = InProcessHost()
    cfg = device_config(tmp_path / "dev", releaser.port)
    with trio.fail_after(10):
        async with Updater(cfg, host=host).connected() as updater:
            with pytest.raises(BadPath):
                await updater.update()
    assert not (tmp_path / "dev" / "outside.txt").exists()
    assert not (tmp_path / "dev" / "state" / "outside.txt").exists()
    assert not (tmp_path / "dev" / "state" / "updates").exists()
    assert releaser.chunks_served == []


async def test_busy_app_defers_normal_update_but_not_a_forced_one(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    offer(releaser, tmp_path, "2.0", 2)
    busy = True
    host = InProcessHost()
    seen: list[str] = []
    cfg = device_config(tmp_path, releaser.port, force_deadline=1.0)
    updater = Updater(
        cfg, host=host, can_update=lambda: not busy, on_progress=lambda p: seen.append(p.state)
    )
    with trio.fail_after(20):
        async with updater.connected(), trio.open_nursery() as nursery:
            nursery.start_soon(updater.update)
            while "deferred" not in seen:
                await trio.sleep(0.05)
            await trio.sleep(1.5)
            assert host.applied == []  # still deferred: the app is busy
            assert load_state(cfg.state_dir).staged is not None  # downloaded meanwhile
            busy = False
            while not host.applied:
                await trio.sleep(0.05)
        assert host.applied == ["2.0"]
        # a forced push goes ahead once the deadline passes, busy or not
        busy = True
        offer(releaser, tmp_path, "3.0", 3)
        async with updater.connected():
            await updater._run_command(
                "__force_update__", UpdateCommand(app="demo", version="3.0", restart=True)
            )
        assert host.applied == ["2.0", "3.0"]


async def test_embedded_app_is_called_back_before_a_notified_update(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    # Embedded mode (issue 12, part 3): the app hears of the update through its
    # callback, with the version and when it starts; notify_wait later it goes.
    offer(releaser, tmp_path, "2.0", 2)
    host = InProcessHost()
    told: list[tuple[float, dict[str, object]]] = []
    cfg = device_config(tmp_path, releaser.port, notify_wait=1.0, activity_poll=0.1)
    updater = Updater(
        cfg, host=host, on_update_pending=lambda p: told.append((trio.current_time(), p))
    )
    updater.activity.report(2)  # what local.report_activity does over the socket
    with trio.fail_after(20):
        async with updater.connected():
            start = trio.current_time()
            await updater.update()
            applied = trio.current_time()
    assert host.applied == ["2.0"]
    (first_at, first), (last_at, last) = told[0], told[-1]
    assert first["version"] == "2.0" and first["users"] == 2
    assert "2 users active (the app is notified" in str(first["reason"])
    assert first_at - start < 0.9 and applied - first_at >= 0.9, "notify_wait not kept"
    # Told again as it begins: starts_at is then now.
    assert last["starts_at"] <= time.time() and last_at >= first_at + 0.9
