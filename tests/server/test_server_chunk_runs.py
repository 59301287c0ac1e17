"""send_chunks over store chunks: runs read together into reused buffers, sent as runs.

Unit tests of server/chunks.py with a real ChunkCache and a real file; reads
run in worker threads, as on the releaser (issue 14, item 3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from fleetpush.protocol import IntegrityError
from fleetpush.server.chunk_io import ChunkSource
from fleetpush.server.chunks import RUN_BYTES, CacheShare, ChunkCache, ChunkJob, send_chunks
from fleetpush.server.errors import ChunkUnavailable

CHUNK = 1024 * 1024


def _jobs(path: Path, count: int, first: int = 0) -> list[ChunkJob]:
    return [
        ChunkJob(
            file=0, chunk=i, key=(str(path), 0, i), size=CHUNK,
            source=ChunkSource(path, i * CHUNK), what=f"f.bin chunk {i}",
        )
        for i in range(first, first + count)
    ]  # fmt: skip


async def _serve(
    cache: ChunkCache, jobs: list[ChunkJob], prefetch: ChunkJob | None = None
) -> list[tuple[list[int], bytes]]:
    runs: list[tuple[list[int], bytes]] = []

    async def send(job: ChunkJob, data: bytes | bytearray) -> None:
        raise AssertionError("runs go through send_run")

    async def send_run(run: Sequence[ChunkJob], data: list[bytes | bytearray]) -> None:
        runs.append(([j.chunk for j in run], b"".join(data)))

    async def finish() -> None:
        pass

    share = CacheShare()
    with trio.fail_after(10):
        await send_chunks(
            cache, jobs, send, finish, prefetch=prefetch, share=share, send_run=send_run
        )
    assert share.pinned == 0 and cache.pinned_bytes == 0
    return runs


async def test_consecutive_chunks_are_read_and_sent_as_runs_in_order(tmp_path: Path) -> None:
    payload = os.urandom(10 * CHUNK)
    (tmp_path / "f.bin").write_bytes(payload)
    cache = ChunkCache(48 * CHUNK, max_reads=2)
    runs = await _serve(cache, _jobs(tmp_path / "f.bin", 10))
    per_run = RUN_BYTES // CHUNK
    assert [chunks for chunks, _ in runs] == [
        list(range(i, min(i + per_run, 10))) for i in range(0, 10, per_run)
    ]
    assert b"".join(data for _, data in runs) == payload
    # A second download of the same release is served from the cache.
    misses = cache.misses
    again = await _serve(cache, _jobs(tmp_path / "f.bin", 10))
    assert b"".join(data for _, data in again) == payload and cache.misses == misses


async def test_evicted_buffers_are_reused_within_the_budget(tmp_path: Path) -> None:
    payload = os.urandom(24 * CHUNK)
    (tmp_path / "f.bin").write_bytes(payload)
    cache = ChunkCache(0, max_reads=2)  # the minimum: a handful of chunks
    for first in range(0, 24, 4):
        runs = await _serve(cache, _jobs(tmp_path / "f.bin", 4, first))
        assert b"".join(d for _, d in runs) == payload[first * CHUNK : (first + 4) * CHUNK]
        assert cache.used_bytes + cache.spare_bytes <= cache.max_bytes
    assert cache.peak_pinned <= cache.max_bytes


async def test_a_short_file_fails_its_run_after_the_runs_before_it(tmp_path: Path) -> None:
    payload = os.urandom(6 * CHUNK)
    (tmp_path / "f.bin").write_bytes(payload[: 5 * CHUNK + 10])
    cache = ChunkCache(48 * CHUNK, max_reads=2)
    sent: list[int] = []

    async def send(job: ChunkJob, data: bytes | bytearray) -> None:
        raise AssertionError("runs go through send_run")

    async def send_run(run: Sequence[ChunkJob], data: list[bytes | bytearray]) -> None:
        sent.extend(j.chunk for j in run)

    async def finish() -> None:
        raise AssertionError("it failed")

    with pytest.raises(ChunkUnavailable, match="chunk 4") as info, trio.fail_after(10):
        await send_chunks(cache, _jobs(tmp_path / "f.bin", 6), send, finish, send_run=send_run)
    assert sent == [0, 1, 2, 3]  # the first run, whole; the second (4, 5) is short
    assert isinstance(info.value.__cause__, IntegrityError)
    assert cache.pinned_bytes == 0 and cache.used_bytes == 4 * CHUNK
