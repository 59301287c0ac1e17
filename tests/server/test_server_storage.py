"""What the releaser keeps on disk (issue 10, items 15, 13, 2): who may read it, what is
left behind, how much a device may make it store, and what happens when the disk is full.

Real releasers (fleetpush.server.serve on loopback) over real data dirs; the
publishes are real ``publish_release`` calls in subprocesses.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.messages import (
    AppStatus,
    CheckUpdate,
    Empty,
    StatusResult,
    UpdateProgress,
)
from fleetpush.server import ServerConfig, db
from fleetpush.server import services as services_module
from fp_fs import fill, small_tmpfs
from fp_releaser import approve, approve_in_store, running_releaser
from fp_trees import make_tree
from server_helpers import connect, publish

from fleetpush.operator import connect as operator_connect


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- item 15: the data dir and the database are the releaser's alone --------------------


async def test_a_new_data_dir_and_database_are_private(config: ServerConfig) -> None:
    old = os.umask(0o022)  # the usual default, which made them 0755 / 0644
    try:
        with trio.fail_after(20):
            async with running_releaser(config) as server:
                async with connect(server.port, peer_id="dev-1"):
                    pass
                path = db.db_path(config.data_dir)
                assert mode(config.data_dir) == 0o700
                for f in (path, path.with_name(path.name + "-wal")):
                    assert mode(f) == 0o600, f
    finally:
        os.umask(old)


async def test_a_readable_data_dir_and_database_are_tightened_with_a_warning(
    config: ServerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20):
        async with running_releaser(config):
            pass
    path = db.db_path(config.data_dir)
    os.chmod(config.data_dir, 0o755)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="fleetpush.server"):
        with trio.fail_after(20):
            async with running_releaser(config):
                assert mode(config.data_dir) == 0o700
                assert mode(path) == 0o600
    warned = [r.getMessage() for r in caplog.records if "readable by others" in r.getMessage()]
    assert any(str(config.data_dir) in w and "755" in w for w in warned), warned
    assert any(str(path) in w and "644" in w for w in warned), warned


# --- item 13: staging dirs of killed publishes go while the releaser serves -------------

#: A real publish that stops for good once its files are copied into staging.
STALLED_PUBLISH = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fleetpush.protocol.keys import private_key_from_seed
    from fleetpush.server import publish

    copy = publish._entries

    def copy_then_stall(*args, **kwargs):
        out = copy(*args, **kwargs)
        print("staged", flush=True)
        time.sleep(3600)
        return out

    publish._entries = copy_then_stall
    publish.publish_release(
        Path(sys.argv[1]), Path(sys.argv[2]), app="demo", version=sys.argv[3],
        signing_keys=[private_key_from_seed(bytes(32))],
    )
    """
)


def start_publish(data_dir: Path, src: Path, version: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_PUBLISH, str(data_dir), str(src), version],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "staged\n"
    return proc


def staging_dirs(data_dir: Path) -> set[str]:
    return {
        p.name
        for p in (data_dir / "releases").glob(".staging-*")
        if not p.name.endswith(".lock")
    }


async def test_a_killed_publishs_staging_dir_is_removed_while_serving_a_live_one_kept(
    config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services_module, "HOUSEKEEPING_INTERVAL", 0.1)
    src = make_tree(tmp_path / "src", {"app.bin": 3 * 1024 * 1024, "lib/a.txt": b"a"})
    with trio.fail_after(60):
        async with running_releaser(config):
            killed = start_publish(config.data_dir, src, "1.0")
            live = start_publish(config.data_dir, src, "2.0")
            try:
                both = staging_dirs(config.data_dir)
                assert len(both) == 2
                await trio.sleep(1.0)  # ten sweeps: a live publish keeps its staging dir
                assert staging_dirs(config.data_dir) == both
                killed.send_signal(signal.SIGKILL)
                killed.wait()
                with trio.fail_after(10):
                    while len(staging_dirs(config.data_dir)) == 2:
                        await trio.sleep(0.05)
                left = staging_dirs(config.data_dir)
                assert len(left) == 1 and left < both
                await trio.sleep(0.5)
                assert staging_dirs(config.data_dir) == left  # the live one, untouched
                # The killed publish's lock file went with its dir.
                names = {p.name for p in (config.data_dir / "releases").iterdir()}
                assert names == {*left, *(f"{n}.lock" for n in left)}
            finally:
                for proc in (killed, live):
                    proc.kill()
                    proc.wait()
                    assert proc.stdout is not None
                    proc.stdout.close()
            with trio.fail_after(10):
                while staging_dirs(config.data_dir):
                    await trio.sleep(0.05)
            assert not list((config.data_dir / "releases").iterdir())


async def test_a_staging_dir_without_a_lock_goes_only_by_age(
    config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging dir of an older fleetpush (no lock file) is kept an hour, then removed."""
    monkeypatch.setattr(services_module, "HOUSEKEEPING_INTERVAL", 0.1)
    releases = config.data_dir / "releases"
    young, old = releases / ".staging-young", releases / ".staging-old"
    for d in (young, old):
        (d / "f").parent.mkdir(parents=True)
        (d / "f").write_bytes(b"x")
    os.utime(old, (0, 0))
    with trio.fail_after(20):
        async with running_releaser(config):
            await trio.sleep(0.5)
            assert staging_dirs(config.data_dir) == {".staging-young"}


# --- item 2: a full disk locks no device out; a device cannot fill it ------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (fp_fs.py; needs root)."""
    with small_tmpfs(tmp_path, "24m") as mnt:
        yield mnt


def db_bytes(data_dir: Path) -> int:
    path = db.db_path(data_dir)
    files = (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
    return sum(f.stat().st_size for f in files if f.exists())


PROBE = Ed25519PrivateKey.generate()


async def status_of(port: int) -> StatusResult:
    """``status`` as a known device (a new one cannot register on a full disk)."""
    async with connect(port, PROBE, peer_id="status-probe") as dev:
        result: StatusResult = await dev.request("status", Empty())
        return result


async def test_a_device_cannot_fill_the_disk_and_a_full_disk_locks_no_known_device_out(
    config: ServerConfig,
    operator_key: Ed25519PrivateKey,
    tmp_path: Path,
    small_fs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = small_fs / "data"
    config = attrs.evolve(config, data_dir=data_dir)
    publish(data_dir, tmp_path, "1.0")
    approve_in_store(data_dir, "1.0")
    keys = [Ed25519PrivateKey.generate() for _ in range(5)]
    caplog.set_level(logging.WARNING, logger="fleetpush.server")
    with trio.fail_after(120):
        async with running_releaser(config) as server:
            for i, key in enumerate(keys):
                async with connect(server.port, key, peer_id=f"known-{i}") as dev:
                    await dev.request("check_update", CheckUpdate(app="demo", version="0.9"))
            assert not (await status_of(server.port)).low_disk
            before = db_bytes(data_dir)

            # One stranger sends what used to grow the database by 268 MB: 39
            # app statuses with 1.28 MB of log tail each, and 300 failures with
            # 60 KB errors. Its storage budget keeps the database small.
            async with connect(server.port, peer_id="stranger") as dev:
                tail = [f"{i:02d}" + "x" * 64_000 for i in range(20)]
                for _ in range(39):
                    await dev.peer.notify("app_status", AppStatus(state="error", log_tail=tail))
                for _ in range(300):
                    await dev.peer.notify(
                        "update_progress", UpdateProgress(state="failed", error="e" * 60_000)
                    )
                await dev.request("ping", Empty())
            server.server.services.writer.flush()
            assert db_bytes(data_dir) - before < 2 * 1024 * 1024
            async with operator_connect(("127.0.0.1", server.port), operator_key) as op:
                [row] = [d for d in await op.list_devices() if d.device_id == "stranger"]
            assert row.app_status is not None and row.app_status["state"] == "error"
            assert row.last_result is not None and len(str(row.last_result["error"])) < 2000

            # Now the disk fills up (something else on the volume).
            fill(small_fs / "filler")
            with trio.fail_after(10):
                while not (await status_of(server.port)).low_disk:
                    await trio.sleep(0.2)
            assert any("low disk" in r.getMessage() for r in caplog.records)
            # Every known device still gets in and is answered.
            for i, key in enumerate(keys):
                async with connect(server.port, key, peer_id=f"known-{i}") as dev:
                    assert dev.status == "accepted"
                    offer = await dev.request(
                        "check_update", CheckUpdate(app="demo", version="0.9")
                    )
                    assert offer.available and offer.version == "1.0"
                    await dev.peer.notify("app_status", AppStatus(state="running"))
                    await dev.request("ping", Empty())

            # Space comes back: a small fix release (0.3 MB) is published and offered.
            (small_fs / "filler").unlink()
            with trio.fail_after(10):
                while (await status_of(server.port)).low_disk:
                    await trio.sleep(0.2)
            assert any("disk space recovered" in r.getMessage() for r in caplog.records)
            publish(data_dir, tmp_path, "1.1", files={"app.bin": os.urandom(300_000)})
            await approve(server, "1.1", key=operator_key)
            async with connect(server.port, keys[0], peer_id="known-0") as dev:
                offer = await dev.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert offer.available and offer.version == "1.1"
                files = await dev.download("demo", "1.1")
                assert len(files["app.bin"]) == 300_000


async def test_the_current_app_status_is_kept_past_the_rate_limit(
    config: ServerConfig, operator_key: Ed25519PrivateKey
) -> None:
    # The rate limit holds back history, never the device's current state: an
    # agent whose app flaps (stop, start, crash, restart) in a burst must not
    # be listed as "stopped" while its app runs again.
    with trio.fail_after(30):
        async with running_releaser(config) as server:
            async with connect(server.port, peer_id="flapper") as dev:
                for i in range(40):
                    state = "stopped" if i % 2 else "starting"
                    await dev.peer.notify("app_status", AppStatus(state=state, pid=i))
                await dev.peer.notify("app_status", AppStatus(state="running", pid=4242))
                await dev.request("ping", Empty())
            server.server.services.writer.flush()
            async with operator_connect(("127.0.0.1", server.port), operator_key) as op:
                [row] = [d for d in await op.list_devices() if d.device_id == "flapper"]
            assert row.app_status is not None
            assert (row.app_status["state"], row.app_status["pid"]) == ("running", 4242)
            limits = server.server.services.rates
            assert limits.refused.get("app_status", 0) > 0  # the burst did hit the limit
