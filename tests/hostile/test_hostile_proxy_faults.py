"""A real updater downloads through the fault proxy (latency, stalls, resets mid-chunk).

Every download must complete by resuming, re-send less than 5 % of the release
(bytes the proxy forwarded beyond a clean run's count), and stage exactly the
published bytes. 256 KiB chunks: what a fleet on bad links would publish; a
reset wastes at most the chunk in flight plus what sat in socket buffers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from faultproxy import FaultProxy, Faults
from fleetpush.client.updater import Updater
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser
from fp_trees import make_release_dir, tree_digests
from hostile_fleet import (
    device_config,
    publish_approved,
    stage_with_resume,
    staged_digests,
)

SIZE = 16 * 1024 * 1024
CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("proxy-release")
    src = make_release_dir(tmp / "src", SIZE)
    publish_approved(tmp / "data", src, "2.0.0", chunk_size=CHUNK)
    return tmp / "data", src


async def _download(data_dir: Path, src: Path, root: Path, faults: Faults) -> tuple[int, dict]:
    async with releaser(data_dir) as handle, trio.open_nursery() as nursery:
        proxy = FaultProxy(handle.port, faults)
        await nursery.start(proxy.run)
        updater = Updater(device_config(root, f"127.0.0.1:{proxy.port}", root.name))
        async with updater.connected():
            result = await stage_with_resume(updater, 90)
        nursery.cancel_scope.cancel()
    assert staged_digests(root / "state", "2.0.0") == tree_digests(src), "staged bytes differ"
    result["proxy"] = proxy
    return proxy.bytes_down, result


@pytest.fixture(scope="module")
def clean_bytes(release: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> int:
    """Bytes a clean download sends through the proxy (the release plus protocol overhead)."""
    data_dir, src = release
    root = tmp_path_factory.mktemp("clean")
    clean, _ = trio.run(_download, data_dir, src, root, Faults())
    assert SIZE <= clean < SIZE * 1.01
    return clean


def _resent(bytes_down: int, clean: int) -> float:
    return (bytes_down - clean) / SIZE


@pytest.mark.slow
async def test_download_through_200ms_latency(
    release: tuple[Path, Path], clean_bytes: int, tmp_path: Path
) -> None:
    data_dir, src = release
    down, result = await _download(data_dir, src, tmp_path / "lat", Faults(latency=0.2))
    print(f"200 ms latency: {result['elapsed']:.1f}s, re-sent {_resent(down, clean_bytes):.2%}")
    assert _resent(down, clean_bytes) < 0.05
    assert result["attempts"] == 1  # latency alone never breaks the session


@pytest.mark.slow
async def test_download_through_a_stall(
    release: tuple[Path, Path], clean_bytes: int, tmp_path: Path
) -> None:
    """Forwarding stops dead for 8 s mid-download (TCP stays up); the download carries on."""
    data_dir, src = release
    faults = Faults(stall_after=5_000_011, stall_for=8.0)
    down, result = await _download(data_dir, src, tmp_path / "stall", faults)
    print(f"8 s stall: {result['elapsed']:.1f}s, re-sent {_resent(down, clean_bytes):.2%}")
    assert result["elapsed"] >= 8.0  # the stall really happened
    assert _resent(down, clean_bytes) < 0.05


@pytest.mark.slow
async def test_download_through_resets_mid_chunk(
    release: tuple[Path, Path], clean_bytes: int, tmp_path: Path
) -> None:
    """Two connections are reset (RST) part-way through a chunk; each resume fetches the rest."""
    data_dir, src = release
    # None of these is a multiple of the chunk size: every reset cuts a chunk.
    faults = Faults(resets=[3_000_001, 4_100_003])
    down, result = await _download(data_dir, src, tmp_path / "reset", faults)
    proxy = result["proxy"]
    print(
        f"2 resets: {result['elapsed']:.1f}s, {result['attempts']} attempts, "
        f"re-sent {_resent(down, clean_bytes):.2%}"
    )
    assert proxy.resets_done == 2
    assert result["attempts"] >= 2  # it really had to resume
    assert _resent(down, clean_bytes) < 0.05


@pytest.mark.slow
async def test_download_with_bounded_bandwidth_and_latency(
    release: tuple[Path, Path], clean_bytes: int, tmp_path: Path
) -> None:
    """8 MB/s with 50 ms latency and one reset: slow, lossy links still converge."""
    data_dir, src = release
    faults = Faults(latency=0.05, rate=8e6, resets=[6_000_013])
    down, result = await _download(data_dir, src, tmp_path / "bw", faults)
    print(f"8 MB/s + reset: {result['elapsed']:.1f}s, re-sent {_resent(down, clean_bytes):.2%}")
    assert result["elapsed"] >= SIZE / 8e6 * 0.9
    assert _resent(down, clean_bytes) < 0.05


RESETS = [2_000_003]


@pytest.mark.slow
async def test_forced_push_survives_a_reset_without_help(tmp_path: Path) -> None:
    """The updater itself (no retry loop in the test) must finish a pushed download."""
    from fleetpush.client.state import load_state

    from fleetpush.operator import connect as operator_connect

    src = make_release_dir(tmp_path / "src", 4 * 1024 * 1024)
    publish_approved(tmp_path / "data", src, "2.0.0", chunk_size=CHUNK)
    root = tmp_path / "dev"
    with trio.fail_after(60):
        async with (
            releaser(tmp_path / "data", operators=[OPERATOR_KEY]) as handle,
            trio.open_nursery() as nursery,
        ):
            proxy = FaultProxy(handle.port, Faults(rate=4e6, resets=RESETS))
            await nursery.start(proxy.run)
            updater = Updater(device_config(root, f"127.0.0.1:{proxy.port}", "push-dev"))
            async with updater.connected():
                address = ("127.0.0.1", handle.port)
                async with operator_connect(address, OPERATOR_KEY, name="ops") as op:
                    while not any(d.connected for d in await op.list_devices()):
                        await trio.sleep(0.05)
                    await op.push(
                        app="hostile", version="2.0.0", mode="stage", devices=["push-dev"]
                    )
                with trio.move_on_after(20):
                    while (s := load_state(root / "state")).staged is None:
                        await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert proxy.resets_done == len(RESETS)
    assert s.staged is not None and s.staged.version == "2.0.0"
