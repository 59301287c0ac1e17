"""An update from 1.0 to 2.0 against the real releaser fetches only what changed (issue 14).

Real releaser (fleetpush.server.serve) on 127.0.0.1 port 0, releases cut by
FastCDC (``publish_release(chunking="cdc")``), the device's real Updater:
an unchanged file is neither fetched nor staged and stays installed; a file
moved to another path with bytes inserted is mostly copied from the
installed one; every installed byte is the release's.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio
from fleet_helpers import InProcessHost
from fleetpush.client.updater import Updater
from fp_devices import device_config
from fp_releaser import publish_and_approve, releaser

SIZE = 2 * 1024 * 1024


def write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


async def test_an_update_fetches_only_what_changed(tmp_path: Path) -> None:
    rng = random.Random(14)
    same, moving = rng.randbytes(SIZE), rng.randbytes(SIZE)
    v1 = {"same.bin": same, "lib/old.bin": moving, "app.txt": b"1\n"}
    # 2.0: same.bin unchanged; old.bin renamed, 10 KiB inserted in the middle.
    grown = moving[: SIZE // 2] + rng.randbytes(10 * 1024) + moving[SIZE // 2 :]
    v2 = {"same.bin": same, "lib/new.bin": grown, "app.txt": b"2\n"}
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            for version, files in (("1.0", v1), ("2.0", v2)):
                src = write(tmp_path / f"src-{version}", files)
                await publish_and_approve(handle, tmp_path / "data", src, version, chunking="cdc")
            cfg = device_config(tmp_path / "dev", handle.port, version="0.9")
            host = InProcessHost()
            async with Updater(cfg, host=host).connected() as updater:
                await updater.update(version="1.0")
                first = updater.last_download
                await updater.update()
                second = updater.last_download
    assert host.applied == ["1.0", "2.0"]
    assert first is not None and second is not None and second.version == "2.0"
    assert first.bytes_fetched == 2 * SIZE + 2
    assert (second.files_unchanged, second.bytes_unchanged) == (1, SIZE)
    # new.bin: only the chunks around the insertion (FastCDC: <= 256 KiB each)
    assert second.bytes_copied >= SIZE - 512 * 1024
    assert second.bytes_fetched <= 10 * 1024 + 512 * 1024 + 2
    assert (
        second.bytes_fetched + second.bytes_copied + second.bytes_unchanged == len(grown) + SIZE + 2
    )
    for rel, data in v2.items():
        assert (cfg.app_root / rel).read_bytes() == data
    assert not (cfg.app_root / "lib/old.bin").exists()


async def test_compressible_chunks_arrive_as_data_zstd_and_install_intact(tmp_path: Path) -> None:
    # publish --compress: the releaser keeps zstd frames of chunks that shrink
    # by >= 10% and sends them as DATA_ZSTD to a device announcing "zstd"
    # (ours does); the device expands each to its signed length (§2.3.1).
    log = b"".join(b"%08d a log line that compresses well\n" % i for i in range(60_000))
    blob = random.Random(15).randbytes(SIZE // 2)
    files = {"log.txt": log, "blob.bin": blob}
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            src = write(tmp_path / "src", files)
            await publish_and_approve(
                handle, tmp_path / "data", src, "1.0", chunking="cdc", compress=True
            )
            cfg = device_config(tmp_path / "dev", handle.port, version="0.9")
            host = InProcessHost()
            async with Updater(cfg, host=host).connected() as updater:
                await updater.update(version="1.0")
                result = updater.last_download
    assert host.applied == ["1.0"]
    assert result is not None
    for rel, data in files.items():
        assert (cfg.app_root / rel).read_bytes() == data
    # the random blob crossed as it is, the log compressed to well under half
    assert len(blob) < result.bytes_fetched < len(blob) + len(log) // 2
