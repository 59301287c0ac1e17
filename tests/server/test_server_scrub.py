"""The background scrub (server/scrub.py): a store changed on disk is noticed, said, not served.

Chunks are served without re-hashing (issue 14, item 3); these tests check what
replaces the serve-time check: a real releaser over real TCP with a release
file corrupted on disk, and the scrub's pacing in virtual time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
import trio
from fleetpush.protocol import ErrorCode, Manifest, RpcError
from fleetpush.protocol.messages import Event, GetChunks
from fleetpush.server import ReleaseStore
from fleetpush.server.scrub import Damage, Scrub, ScrubContext, ScrubTarget
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser
from server_helpers import connect, publish

from fleetpush.operator import connect as operator_connect

CHUNK = 65536


def _approved_release(data_dir: Path, tmp_path: Path, version: str, payload: bytes) -> Path:
    publish(data_dir, tmp_path / version, version, {"big.bin": payload}, chunk_size=CHUNK)
    store = ReleaseStore.open(data_dir)
    try:
        store.set_status("demo", version, "pre-released", "t")
        store.set_status("demo", version, "approved", "t")
        return store.get("demo", version).dir
    finally:
        store.close()


async def test_a_release_corrupted_on_disk_is_reported_and_no_longer_served(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damaged_dir = _approved_release(data_dir, tmp_path, "1.1", os.urandom(300_000))
    healthy = os.urandom(200_000)
    _approved_release(data_dir, tmp_path, "1.2", healthy)
    path = damaged_dir / "big.bin"
    data = bytearray(path.read_bytes())
    data[200_000] ^= 0xFF  # chunk 3
    path.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR, logger="fleetpush.server")

    with trio.fail_after(20):
        async with releaser(data_dir, scrub_rate=4 * 1024 * 1024) as server:
            async with operator_connect(("127.0.0.1", server.port), OPERATOR_KEY) as op:
                events: list[Event] = []

                async def scrubbed() -> bool:
                    events[:] = await op.list_events(kinds=["scrub_failed"])
                    return bool(events)

                while not await scrubbed():
                    await trio.sleep(0.02)
            (event,) = events
            assert event.data == {
                "app": "demo",
                "version": "1.1",
                "path": "big.bin",
                "chunk": 3,
                "error": "its bytes on disk do not match the signed manifest",
            }
            (line,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
            assert line.startswith("release demo 1.1 is damaged on disk and no longer served")
            assert "big.bin chunk 3" in line and "republish" in line

            async with connect(server.port, version="1.0") as dev:
                # Refused before any chunk: not even the intact chunk 0 is sent.
                stream, done = await dev.peer.request_chunks(
                    GetChunks(app="demo", version="1.1", chunks=[(0, 0), (0, 3)])
                )
                assert [c.chunk async for c in stream] == []
                with pytest.raises(RpcError) as e:
                    await done()
                assert e.value.code == ErrorCode.UNAVAILABLE
                assert "damaged on the releaser" in e.value.message
                # The healthy release is served as before, and verifies.
                files = await dev.download("demo", "1.2")
                assert hashlib.sha256(files["big.bin"]).digest() == hashlib.sha256(healthy).digest()


async def test_without_the_scrub_a_changed_chunk_is_served_and_fails_the_devices_check(
    data_dir: Path, tmp_path: Path
) -> None:
    # The releaser no longer hashes what it serves; the device's own check
    # (§7.4) is what keeps a changed chunk from being installed.
    release_dir = _approved_release(data_dir, tmp_path, "1.1", os.urandom(300_000))
    path = release_dir / "big.bin"
    data = bytearray(path.read_bytes())
    data[200_000] ^= 0xFF
    path.write_bytes(bytes(data))
    store = ReleaseStore.open(data_dir)
    manifest = Manifest.from_bytes(store.get("demo", "1.1").signed.signed)
    store.close()
    with trio.fail_after(10):
        async with releaser(data_dir, scrub_rate=0) as server, connect(server.port) as dev:
            stream, done = await dev.peer.request_chunks(
                GetChunks(app="demo", version="1.1", chunks=[(0, 0), (0, 3)])
            )
            got = {c.chunk: bytes(c.payload) async for c in stream}
            await done()
    digests = manifest.files[0].chunks
    assert hashlib.sha256(got[0]).digest() == digests[0]
    assert hashlib.sha256(got[3]).digest() != digests[3]


def _target(tmp_path: Path, size: int, chunk_size: int) -> ScrubTarget:
    from fleetpush.server import build_manifest

    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(size))
    manifest = build_manifest(src, app="demo", version="1.0", sequence=1, chunk_size=chunk_size)
    return ScrubTarget(app="demo", version="1.0", dir=src, manifest=manifest)


async def test_a_pass_reads_no_faster_than_its_rate(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    target = _target(tmp_path, 1024 * 1024, CHUNK)
    found: list[Damage] = []
    scrub = Scrub()
    start = trio.current_time()
    await scrub.scrub_pass(
        ScrubContext(targets=lambda: [target], report=found.append, rate=256 * 1024)
    )
    assert trio.current_time() - start >= 4.0  # 1 MiB at 256 KiB/s, in virtual time
    assert (scrub.passes, scrub.bytes_checked, found) == (1, 1024 * 1024, [])


async def test_a_truncated_file_is_damage_and_a_removed_release_is_not(tmp_path: Path) -> None:
    target = _target(tmp_path, 3 * CHUNK, CHUNK)
    found: list[Damage] = []
    ctx = ScrubContext(targets=lambda: [target], report=found.append, rate=0)
    with (target.dir / "f.bin").open("r+b") as f:
        f.truncate(2 * CHUNK + 10)
    await Scrub().scrub_pass(ctx)
    assert [(d.path, d.chunk) for d in found] == [("f.bin", 2)]
    found.clear()
    (target.dir / "f.bin").unlink()
    target.dir.rmdir()
    scrub = Scrub()
    await scrub.scrub_pass(ctx)
    assert found == [] and scrub.damaged == {}
