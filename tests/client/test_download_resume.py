"""download.py against a tiny releaser over real TCP: verify, resume, local copy, tamper."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from fleet_helpers import MiniReleaser, build_release, chunks_valid
from fleetpush.client.download import DownloadError, download
from fleetpush.client.errors import UnsafePathError
from fleetpush.client.layout import StateLayout
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.errors import IntegrityError
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello
from fp_keys import DEVICE_KEY
from fp_trees import make_tree

from fleetpush.net.dial import dial

FILES = {"bin/app": 300_000, "data/big.bin": 1_000_000, "empty": b"", "README": b"hello\n"}


@asynccontextmanager
async def connected(port: int):  # type: ignore[no-untyped-def]
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="d1",
        public_key=public_bytes(DEVICE_KEY),
        app="demo",
        version="1.0",
    )
    async with dial(("127.0.0.1", port), DEVICE_KEY, hello, timeout=10, name="test") as link:
        yield link.peer


@pytest.fixture
async def releaser(nursery: trio.Nursery, tmp_path: Path) -> MiniReleaser:
    r = MiniReleaser()
    await nursery.start(r.serve)
    return r


def setup_release(tmp_path: Path, r: MiniReleaser, files: dict[str, bytes | int] = FILES):  # type: ignore[no-untyped-def]
    src = make_tree(tmp_path / "src", files, seed=2)
    signed, m = build_release(src, app="demo", version="2.0", sequence=2)
    r.add(src, signed, m)
    layout = StateLayout.of(tmp_path / "state")
    app_root = tmp_path / "app"
    app_root.mkdir()
    return src, signed, m, layout, app_root


async def test_fresh_download_is_complete_and_verified(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    src, signed, m, layout, app_root = setup_release(tmp_path, releaser)
    seen: list[tuple[int, int]] = []
    with trio.fail_after(20):
        async with connected(releaser.port) as peer:
            result = await download(
                peer, signed, m, layout, app_root, on_progress=lambda d, t: seen.append((d, t))
            )
    files = layout.staged_files("2.0")
    for rel in FILES:
        assert (files / rel).read_bytes() == (src / rel).read_bytes()
    assert result.chunks_fetched == m.total_chunks == len(releaser.chunks_served)
    assert seen[-1] == (m.total_size, m.total_size)
    assert layout.staged_manifest("2.0").exists()
    assert not any(app_root.iterdir())  # staging never touches the app root


async def test_unchanged_files_are_copied_locally(releaser: MiniReleaser, tmp_path: Path) -> None:
    src, signed, m, layout, app_root = setup_release(tmp_path, releaser)
    make_tree(app_root, {"data/big.bin": 1_000_000}, seed=2)  # same content as the release
    with trio.fail_after(20):
        async with connected(releaser.port) as peer:
            result = await download(peer, signed, m, layout, app_root)
    big = m.files[[f.path for f in m.files].index("data/big.bin")]
    assert result.chunks_copied == big.chunk_count(m.chunk_size)
    assert result.chunks_fetched == m.total_chunks - result.chunks_copied
    assert all(m.files[fi].path != "data/big.bin" for fi, _ in releaser.chunks_served)
    assert (layout.staged_files("2.0") / "data/big.bin").read_bytes() == (
        src / "data/big.bin"
    ).read_bytes()


async def test_dropped_link_resumes_with_only_missing_chunks(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    src, signed, m, layout, app_root = setup_release(tmp_path, releaser)
    releaser.drop_after = 9
    with trio.fail_after(20):
        async with connected(releaser.port) as peer:
            with pytest.raises(DownloadError):
                await download(peer, signed, m, layout, app_root)
    valid = chunks_valid(layout.staged_files("2.0"), m)
    assert 0 < len(valid) < m.total_chunks
    releaser.chunks_served.clear()
    with trio.fail_after(20):
        async with connected(releaser.port) as peer:
            result = await download(peer, signed, m, layout, app_root)
    assert result.chunks_resumed == len(valid)
    assert (
        set(releaser.chunks_served)
        == {(fi, ci) for fi, f in enumerate(m.files) for ci in range(f.chunk_count(m.chunk_size))}
        - valid
    )
    for rel in FILES:
        assert (layout.staged_files("2.0") / rel).read_bytes() == (src / rel).read_bytes()


async def test_tampered_chunk_is_refused_and_never_written(
    releaser: MiniReleaser, tmp_path: Path
) -> None:
    _src, signed, m, layout, app_root = setup_release(tmp_path, releaser)
    fi = [f.path for f in m.files].index("data/big.bin")
    releaser.tamper = {(fi, 3)}
    with trio.fail_after(20):
        async with connected(releaser.port) as peer:
            with pytest.raises(IntegrityError, match=r"data/big\.bin chunk 3"):
                await download(peer, signed, m, layout, app_root)
    valid = chunks_valid(layout.staged_files("2.0"), m)
    assert (fi, 3) not in valid
    assert not layout.staged_marker("2.0").exists()


async def test_symlink_in_staging_is_never_followed(releaser: MiniReleaser, tmp_path: Path) -> None:
    _src, signed, m, layout, app_root = setup_release(tmp_path, releaser)
    outside = tmp_path / "outside"
    outside.mkdir()
    files = layout.staged_files("2.0")
    files.mkdir(parents=True)
    (files / "data").symlink_to(outside)  # planted by an attacker with local access
    with trio.fail_after(20):
        async with connected(releaser.port) as peer:
            with pytest.raises(UnsafePathError):
                await download(peer, signed, m, layout, app_root)
    assert not any(outside.iterdir())
