"""Content-defined chunks at publish time and on the releaser (§7.3.3; issue 14, item 4)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio
from fleetpush.protocol import ErrorCode, Manifest, RpcError, sign_manifest
from fleetpush.protocol.compression import decompress_chunk
from fleetpush.protocol.errors import IntegrityError
from fleetpush.protocol.handshake import VARIABLE_CHUNKS, ZSTD
from fleetpush.protocol.messages import CheckUpdate, GetChunks, GetManifest
from fleetpush.server import PublishError, ReleaseStore, build_manifest, publish_release
from fleetpush.server.chunk_pack import load_index, pack_path, read_verified_frame
from fleetpush.server.chunking import CDC_AVG, CDC_MAX, CDC_MIN, CdcCut, GivenCut, index_file
from fp_releaser import approve_in_store, running_releaser
from pyfastcdc import FastCDC
from server_helpers import connect, publish

MiB = 1024 * 1024


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _insert(data: bytes, at: list[int], seed: int) -> bytes:
    out = bytearray(data)
    for i, offset in enumerate(sorted(at, reverse=True)):
        out[offset:offset] = _noise(4096, seed + i)
    return bytes(out)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _manifest(tmp: Path, name: str, files: dict[str, bytes], chunking: str = "cdc") -> Manifest:
    return build_manifest(
        _tree(tmp / name, files), app="demo", version="1.0", sequence=1, chunking=chunking
    )


def test_cdc_cuts_survive_insertions(tmp_path: Path) -> None:
    # Issue 14: three 4 KiB insertions made fixed 1 MiB chunks re-send 202 of 256 MB.
    # 64 MiB of noise is ~1,000 chunks; each insertion may change the chunk it
    # lands in and its neighbour, so >= 99% of the digests must be shared.
    before = _noise(64 * MiB, 1)
    after = _insert(before, [5 * MiB + 17, 31 * MiB + 4099, 60 * MiB + 1], seed=10)
    old = _manifest(tmp_path, "old", {"big.bin": before}).files[0]
    new = _manifest(tmp_path, "new", {"big.bin": after}).files[0]
    shared = set(old.chunks)
    kept = sum(1 for d in new.chunks if d in shared)
    assert len(new.chunks) > 500
    assert kept / len(new.chunks) >= 0.99, (kept, len(new.chunks))
    fixed_old = _manifest(tmp_path, "fold", {"big.bin": before}, "fixed").files[0]
    fixed_new = _manifest(tmp_path, "fnew", {"big.bin": after}, "fixed").files[0]
    fixed_kept = len(set(fixed_old.chunks) & set(fixed_new.chunks))
    assert fixed_kept < len(fixed_new.chunks) // 4  # what CDC fixes: fixed cuts lose alignment


def test_cdc_chunks_respect_the_bounds_and_cover_the_file(tmp_path: Path) -> None:
    data = _noise(8 * MiB + 123, 2)
    m = _manifest(tmp_path, "t", {"a.bin": data, "small.txt": b"hello", "empty": b""})
    assert m.chunk_size == CDC_MAX and m.variable_chunks
    files = {f.path: f for f in m.files}
    big = files["a.bin"]
    assert big.sizes is not None and sum(big.sizes) == len(data)
    assert all(CDC_MIN <= n <= CDC_MAX for n in big.sizes[:-1])
    for i, digest in enumerate(big.chunks):
        offset, length = big.chunk_span(m.chunk_size, i)
        assert hashlib.sha256(data[offset : offset + length]).digest() == digest
    assert files["small.txt"].sizes == [5]
    assert (files["empty"].sizes, files["empty"].chunks) == ([], [])
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_fixed_chunking_keeps_the_1_0_manifest(tmp_path: Path) -> None:
    m = _manifest(tmp_path, "t", {"a.bin": _noise(3 * MiB, 3)}, "fixed")
    assert m.chunk_size == MiB and not m.variable_chunks
    assert m.files[0].sizes is None and len(m.files[0].chunks) == 3


def test_an_identical_republish_gives_identical_chunks(
    data_dir: Path, tmp_path: Path, release_key
) -> None:
    files = {"bin/app": _noise(3 * MiB, 4), "etc/conf": b"x = 1\n" * 1000}
    publish(data_dir, tmp_path / "a", "1.0", files, key=release_key, chunking="cdc")
    publish(data_dir, tmp_path / "b", "1.1", files, key=release_key, chunking="cdc")
    store = ReleaseStore.open(data_dir)
    try:
        one, two = (Manifest.from_bytes(store.get("demo", v).signed.signed) for v in ("1.0", "1.1"))
    finally:
        store.close()
    assert one.variable_chunks
    assert [(f.path, f.sizes, f.chunks) for f in one.files] == [
        (f.path, f.sizes, f.chunks) for f in two.files
    ]


def test_a_signed_variable_manifest_is_checked_at_its_own_cuts(
    data_dir: Path, tmp_path: Path, release_key
) -> None:
    src = _tree(tmp_path / "src", {"a.bin": _noise(MiB, 5)})
    m = build_manifest(src, app="demo", version="2.0", sequence=1, chunking="cdc")
    signed = sign_manifest(m.to_bytes(), [release_key])
    info = publish_release(data_dir, src, signed=signed)
    assert info.version == "2.0"
    (src / "a.bin").write_bytes(_noise(MiB, 6))
    m3 = build_manifest(src, app="demo", version="3.0", sequence=2, chunking="cdc")
    (src / "a.bin").write_bytes(_noise(MiB, 5))  # content other than signed
    with pytest.raises(PublishError, match="differs from the signed manifest"):
        publish_release(data_dir, src, signed=sign_manifest(m3.to_bytes(), [release_key]))


def test_given_cuts_refuse_a_file_of_another_length(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    assert index_file(path, "f", GivenCut((2, 4)), "sha256").entry.sizes == [2, 4]
    with pytest.raises(PublishError, match="shorter"):
        index_file(path, "f", GivenCut((2, 5)), "sha256")
    with pytest.raises(PublishError, match="longer"):
        index_file(path, "f", GivenCut((2, 3)), "sha256")


def test_index_file_copies_while_it_cuts(tmp_path: Path) -> None:
    data = _noise(2 * MiB, 7)
    (tmp_path / "in").write_bytes(data)
    done = index_file(tmp_path / "in", "in", CdcCut(), "sha256", copy_to=tmp_path / "out/in")
    assert (tmp_path / "out/in").read_bytes() == data
    assert done.entry.digest == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"chunking": "rsync"}, "unknown chunking 'rsync'"),
        ({"chunking": "cdc", "chunk_size": 64 * 1024}, "too small for content-defined"),
    ],
)
def test_bad_chunking_options_are_refused(tmp_path: Path, kw: dict, words: str) -> None:
    with pytest.raises(PublishError, match=words):
        build_manifest(
            _tree(tmp_path / "t", {"a": b"a"}), app="demo", version="1.0", sequence=1, **kw
        )


async def test_a_device_without_chunks_v_is_refused_a_variable_release(
    config, data_dir: Path, tmp_path: Path, release_key
) -> None:
    files = {"bin/app": _noise(MiB // 2, 8), "README": b"hi"}
    publish(data_dir, tmp_path, "1.1", files, key=release_key, chunking="cdc")
    approve_in_store(data_dir, "1.1")
    want = (
        "release demo 1.1 uses content-defined chunks, which this device did not announce "
        "in its hello capabilities; upgrade fleetpush on the device"
    )
    with trio.fail_after(20):
        async with running_releaser(config) as server:
            async with connect(server.port, peer_id="old-1") as old:
                for method, params in (
                    ("check_update", CheckUpdate(app="demo", version="1.0")),
                    ("get_manifest", GetManifest(app="demo", version="1.1")),
                    ("get_chunks", GetChunks(app="demo", version="1.1", chunks=[(0, 0)])),
                ):
                    with pytest.raises(RpcError) as e:
                        await old.request(method, params)
                    assert (e.value.code, e.value.message) == (ErrorCode.UNAVAILABLE, want)
            async with connect(server.port, peer_id="new-1", capabilities=[VARIABLE_CHUNKS]) as dev:
                r = await dev.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert (r.available, r.version) == (True, "1.1")
                assert await dev.download("demo", "1.1") == files


def test_block_wise_cutting_gives_the_cuts_of_one_pass(tmp_path: Path) -> None:
    # index_file reads 8 MiB blocks and re-cuts the chunk reaching a block's end:
    # the cuts must be exactly those of FastCDC over the whole file at once.
    data = _noise(20 * MiB + 999, 9)
    (tmp_path / "f").write_bytes(data)
    sizes = index_file(tmp_path / "f", "f", CdcCut(), "sha256").entry.sizes
    whole = FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX).cut_buf(data)
    assert sizes == [c.length for c in whole]


async def _fetch(dev, manifest: Manifest) -> tuple[bytes, int]:
    """Every chunk of file 0, expanded where it came as DATA_ZSTD; and how many did."""
    entry = manifest.files[0]
    wanted = [(0, c) for c in range(len(entry.chunks))]
    parts: list[bytes] = []
    zstd = 0
    for start in range(0, len(wanted), 64):
        stream, done = await dev.peer.request_chunks(
            GetChunks(app="demo", version=manifest.version, chunks=wanted[start : start + 64])
        )
        async for got in stream:
            length = entry.chunk_span(manifest.chunk_size, got.chunk)[1]
            data = bytes(got.payload)
            if got.compressed:
                zstd += 1
                assert len(data) < length * 0.9
                data = decompress_chunk(data, length)
            assert hashlib.sha256(data).digest() == entry.chunks[got.chunk]
            parts.append(data)
        await done()
    return b"".join(parts), zstd


async def test_packed_chunks_go_as_data_zstd_only_to_devices_announcing_zstd(
    config, data_dir: Path, tmp_path: Path, release_key
) -> None:
    # Half text (compresses), half noise (does not): only the text chunks are packed.
    data = b"".join(b"line %d of the config\n" % i for i in range(40_000)) + _noise(MiB, 11)
    publish(
        data_dir, tmp_path, "1.1", {"app.bin": data}, key=release_key, chunking="cdc", compress=True
    )
    approve_in_store(data_dir, "1.1")
    with trio.fail_after(30):
        async with running_releaser(config) as server:
            both = [VARIABLE_CHUNKS, ZSTD]
            async with connect(server.port, peer_id="z-1", capabilities=both) as dev:
                r = await dev.request("get_manifest", GetManifest(app="demo", version="1.1"))
                manifest = Manifest.from_bytes(r.manifest.signed)
                got, zstd = await _fetch(dev, manifest)
                assert got == data
                assert 0 < zstd < len(manifest.files[0].chunks)
            async with connect(server.port, peer_id="p-1", capabilities=[VARIABLE_CHUNKS]) as dev:
                assert await _fetch(dev, manifest) == (data, 0)


def test_a_damaged_pack_is_caught_on_the_releaser(data_dir: Path, tmp_path: Path, release_key):
    data = b"abc " * 100_000
    publish(
        data_dir, tmp_path, "1.0", {"a.txt": data}, key=release_key, chunking="cdc", compress=True
    )
    store = ReleaseStore.open(data_dir)
    try:
        record = store.get("demo", "1.0")
    finally:
        store.close()
    manifest = Manifest.from_bytes(record.signed.signed)
    pack = pack_path(record.dir)
    index = load_index(pack)
    assert set(index) == {(0, c) for c in range(len(manifest.files[0].chunks))}
    entry = manifest.files[0]
    where = index[(0, 0)]
    length = entry.chunk_span(manifest.chunk_size, 0)[1]
    frame = read_verified_frame(pack, where, length, "sha256", entry.chunks[0])
    assert decompress_chunk(frame, length) == data[:length]
    with pytest.raises(IntegrityError):
        read_verified_frame(pack, where, length, "sha256", entry.chunks[1])
    with pytest.raises(IntegrityError):
        read_verified_frame(pack, where, length + 1, "sha256", entry.chunks[0])
