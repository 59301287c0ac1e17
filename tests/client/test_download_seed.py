"""The download's seed, unchanged files, variable-size chunks and DATA_ZSTD (issue 14).

Over real TCP against :class:`MiniReleaser`, which counts what it serves: a
chunk the device holds anywhere (another path, another offset) is copied
from there after a re-hash; a seed altered on disk falls back to the
network; an unchanged file costs nothing; compressed chunks expand to their
signed bytes, and a DATA_ZSTD frame that does not is refused and closes the
link.
"""

from __future__ import annotations

import random
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import zstandard
from fleet_helpers import MiniReleaser, build_release
from fleetpush.client.download import DownloadError, capabilities, download
from fleetpush.client.layout import StateLayout
from fleetpush.protocol import PROTOCOL_VERSION, codec
from fleetpush.protocol.errors import CloseCode
from fleetpush.protocol.handshake import VARIABLE_CHUNKS, ZSTD
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello, SignedManifest
from fp_keys import DEVICE_KEY

from fleetpush.net.dial import dial

CHUNK = 16 * 1024  # the largest content-defined chunk (cdc_sizes averages ~10 KiB)


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@asynccontextmanager
async def connected(port: int):  # type: ignore[no-untyped-def]
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="d1",
        public_key=public_bytes(DEVICE_KEY),
        app="demo",
        version="1.0",
        capabilities=capabilities(),
    )
    async with dial(("127.0.0.1", port), DEVICE_KEY, hello, timeout=10, name="test") as link:
        yield link.peer


@pytest.fixture
async def releaser(nursery: trio.Nursery) -> MiniReleaser:
    r = MiniReleaser()
    await nursery.start(r.serve)
    return r


def release(
    tmp_path: Path, name: str, files: dict[str, bytes], version: str, *, cdc: bool = True
) -> tuple[Path, SignedManifest, object]:
    src = tmp_path / name
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    signed, m = build_release(
        src, app="demo", version=version, sequence=int(version[0]), chunk_size=CHUNK, cdc=cdc
    )
    return src, signed, m


def install(tmp_path: Path, src: Path, signed: SignedManifest) -> tuple[StateLayout, Path]:
    """A device running ``src``: its files in the app root, its manifest installed."""
    layout = StateLayout.of(tmp_path / "state")
    app_root = tmp_path / "app"
    shutil.copytree(src, app_root)
    layout.installed_dir.mkdir(parents=True)
    layout.installed_manifest.write_bytes(codec.packb(codec.to_wire(signed)))
    return layout, app_root


def test_the_device_announces_variable_chunks_and_zstd() -> None:
    assert VARIABLE_CHUNKS in capabilities()
    assert ZSTD in capabilities()  # zstandard is installed with the test extra


async def test_chunks_are_received_into_a_few_reused_buffers(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    # issue 14, item 1: each payload is received into a pooled buffer, hashed
    # and written from it; buffers come back once written, so a release of
    # ~100 chunks needs a handful of them.
    src, signed, m = release(tmp_path, "r", {"a.bin": noise(1_500_000, 6)}, "1.0")
    releaser.add(src, signed, m)  # type: ignore[arg-type]
    layout = StateLayout.of(tmp_path / "state")
    (tmp_path / "app").mkdir()
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            result = await download(peer, signed, m, layout, tmp_path / "app")  # type: ignore[arg-type]
            pool = peer.conn.data_pool
            assert pool is not None
            assert result.chunks_fetched == m.total_chunks > 60  # type: ignore[attr-defined]
            assert 0 < len(pool) <= 40
            assert pool.allocated <= pool.limit
    assert (layout.staged_files("1.0") / "a.bin").read_bytes() == noise(1_500_000, 6)


async def test_the_seed_reuses_chunks_moved_to_another_path_and_offset(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    body = noise(300_000, 1)
    src1, signed1, _m1 = release(tmp_path, "r1", {"lib/core.bin": body}, "1.0")
    # 2.0 moves the file and inserts 1000 bytes near its start: every later
    # content-defined chunk keeps its digest but sits 1000 bytes further on.
    moved = body[:5000] + noise(1000, 2) + body[5000:]
    src2, signed2, m2 = release(tmp_path, "r2", {"core/renamed.bin": moved}, "2.0")
    releaser.add(src2, signed2, m2)  # type: ignore[arg-type]
    layout, app_root = install(tmp_path, src1, signed1)
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            result = await download(peer, signed2, m2, layout, app_root)  # type: ignore[arg-type]
    staged = layout.staged_files("2.0") / "core/renamed.bin"
    assert staged.read_bytes() == moved
    assert result.chunks_copied > 0
    assert result.chunks_copied + result.chunks_fetched == m2.total_chunks  # type: ignore[attr-defined]
    assert len(releaser.chunks_served) == result.chunks_fetched
    # only the chunks around the insertion crossed the network
    assert result.bytes_fetched == releaser.bytes_sent < 4 * CHUNK
    assert result.bytes_copied + result.bytes_fetched == len(moved)


async def test_a_seed_altered_on_disk_falls_back_to_the_network(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    body = noise(200_000, 3)
    src1, signed1, _m1 = release(tmp_path, "r1", {"a.bin": body}, "1.0")
    src2, signed2, m2 = release(tmp_path, "r2", {"b.bin": body, "a.bin": b"new\n"}, "2.0")
    releaser.add(src2, signed2, m2)  # type: ignore[arg-type]
    layout, app_root = install(tmp_path, src1, signed1)
    # Someone changed the installed file after it was installed: its manifest
    # still names the old digests, its bytes no longer match them.
    altered = bytearray(body)
    for i in range(0, len(altered), 1000):  # every chunk (>= 2 KiB) has one
        altered[i] ^= 0xFF
    (app_root / "a.bin").write_bytes(altered)
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            result = await download(peer, signed2, m2, layout, app_root)  # type: ignore[arg-type]
    assert result.chunks_copied == 0
    assert result.chunks_fetched == m2.total_chunks  # type: ignore[attr-defined]
    assert (layout.staged_files("2.0") / "b.bin").read_bytes() == body
    assert (layout.staged_files("2.0") / "a.bin").read_bytes() == b"new\n"


async def test_an_unchanged_file_is_neither_fetched_nor_staged(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    same = noise(250_000, 4)
    src1, signed1, _m1 = release(tmp_path, "r1", {"same.bin": same, "app.txt": b"1\n"}, "1.0")
    src2, signed2, m2 = release(tmp_path, "r2", {"same.bin": same, "app.txt": b"2\n"}, "2.0")
    releaser.add(src2, signed2, m2)  # type: ignore[arg-type]
    layout, app_root = install(tmp_path, src1, signed1)
    seen: list[tuple[int, int]] = []
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            result = await download(
                peer,
                signed2,
                m2,  # type: ignore[arg-type]
                layout,
                app_root,
                on_progress=lambda d, t: seen.append((d, t)),
            )
    index = [f.path for f in m2.files].index("same.bin")  # type: ignore[attr-defined]
    assert all(fi != index for fi, _ in releaser.chunks_served)
    assert releaser.bytes_sent == result.bytes_fetched == 2  # "2\n", nothing else
    assert (result.files_unchanged, result.bytes_unchanged) == (1, len(same))
    assert result.chunks_copied == 0  # not even copied into staging
    assert not (layout.staged_files("2.0") / "same.bin").exists()
    assert seen[-1] == (len(same) + 2, len(same) + 2)  # progress counts it as done


async def test_compressed_chunks_expand_to_their_signed_bytes(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    text = b"".join(b"line %d of a very compressible log\n" % i for i in range(20_000))
    src, signed, m = release(tmp_path, "r", {"log.txt": text, "blob": noise(50_000, 5)}, "1.0")
    releaser.add(src, signed, m)  # type: ignore[arg-type]
    releaser.zstd = True
    layout = StateLayout.of(tmp_path / "state")
    (tmp_path / "app").mkdir()
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            result = await download(peer, signed, m, layout, tmp_path / "app")  # type: ignore[arg-type]
    assert (layout.staged_files("1.0") / "log.txt").read_bytes() == text
    assert (layout.staged_files("1.0") / "blob").read_bytes() == noise(50_000, 5)
    assert result.chunks_fetched == m.total_chunks  # type: ignore[attr-defined]
    assert releaser.bytes_sent < (len(text) + 50_000) // 2  # the log crossed compressed


@pytest.mark.parametrize(
    "forge",
    [
        # declares one byte more than the chunk
        lambda chunk: zstandard.ZstdCompressor().compress(chunk + b"x"),
        # a bomb: no declared size, 64 MiB of zeros
        lambda chunk: zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20)),
        # declares the chunk's length but holds more
        lambda chunk: zstandard.ZstdCompressor().compress(chunk)[:-3] + b"\x00\x00\x00",
    ],
    ids=["wrong length", "bomb", "corrupt frame"],
)
async def test_a_bad_data_zstd_frame_is_refused_and_closes_the_link(
    releaser: MiniReleaser, tmp_path: Path, forge: object
) -> None:
    text = b"".join(b"record %d\n" % i for i in range(30_000))
    src, signed, m = release(tmp_path, "r", {"log.txt": text}, "1.0")
    releaser.add(src, signed, m)  # type: ignore[arg-type]
    releaser.zstd = True
    releaser.forge_zstd = forge  # type: ignore[assignment]
    layout = StateLayout.of(tmp_path / "state")
    (tmp_path / "app").mkdir()
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            with pytest.raises(DownloadError, match="bad compressed chunk"):
                await download(peer, signed, m, layout, tmp_path / "app")  # type: ignore[arg-type]
            await peer.wait_closed()
            assert peer.close_code == CloseCode.PROTOCOL_ERROR
    staged = (layout.staged_files("1.0") / "log.txt").read_bytes()
    assert staged != text  # nothing of a refused chunk was written
    assert not layout.staged_marker("1.0").exists()
