"""send_chunks: read-ahead, ordered failure, prefetch, and no leaked pins.

Unit tests of server/chunks.py with a real ChunkCache and in-memory loads
(loads run in worker threads, as on the releaser).
"""

from __future__ import annotations

import threading

import pytest
import trio
from fleetpush.protocol import IntegrityError
from fleetpush.server.chunks import ChunkCache, ChunkJob, send_chunks
from fleetpush.server.errors import ChunkUnavailable

SIZE = 1000


def _job(
    i: int, loads: list[int], *, bad: bool = False, gate: threading.Event | None = None
) -> ChunkJob:
    def load() -> bytes:
        if gate is not None:
            assert gate.wait(10), "load gate never opened"
        loads.append(i)
        if bad:
            raise IntegrityError(f"chunk {i} does not match")
        return bytes([i]) * SIZE

    return ChunkJob(file=0, chunk=i, key=("r", 0, i), size=SIZE, load=load, what=f"chunk {i}")


async def test_chunks_go_out_in_order_then_finish() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []
    sent: list[tuple[int, bytes]] = []
    done: list[int] = []

    async def send(job: ChunkJob, data: bytes) -> None:
        await trio.sleep(0.001)
        sent.append((job.chunk, data[:1]))

    async def finish() -> None:
        done.append(len(sent))

    await send_chunks(cache, [_job(i, loads) for i in range(6)], send, finish)
    assert sent == [(i, bytes([i])) for i in range(6)]
    assert done == [6]
    assert cache.pinned_bytes == 0


async def test_the_next_chunk_loads_while_one_is_being_sent() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []
    seen_during_send: list[list[int]] = []

    async def send(job: ChunkJob, data: bytes) -> None:
        # Give the read-ahead time to load the following chunk meanwhile.
        with trio.move_on_after(2):
            while job.chunk + 1 < 3 and job.chunk + 1 not in loads:
                await trio.sleep(0.001)
        seen_during_send.append(list(loads))

    async def finish() -> None:
        pass

    await send_chunks(cache, [_job(i, loads) for i in range(3)], send, finish)
    assert 1 in seen_during_send[0], "chunk 1 was not loaded while chunk 0 was sent"
    assert 2 in seen_during_send[1], "chunk 2 was not loaded while chunk 1 was sent"


async def test_a_bad_chunk_fails_after_the_good_ones_and_leaves_nothing_pinned() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []
    sent: list[int] = []
    finished: list[bool] = []

    async def send(job: ChunkJob, data: bytes) -> None:
        sent.append(job.chunk)

    async def finish() -> None:
        finished.append(True)

    jobs = [_job(0, loads), _job(1, loads), _job(2, loads, bad=True), _job(3, loads)]
    with pytest.raises(ChunkUnavailable, match="chunk 2") as info:
        await send_chunks(cache, jobs, send, finish)
    assert isinstance(info.value.__cause__, IntegrityError)
    assert sent == [0, 1] and not finished
    assert 3 not in loads, "a chunk after the bad one was read"
    assert cache.pinned_bytes == 0


async def test_a_failing_send_raises_unwrapped_and_unpins_the_read_ahead() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []

    class Gone(Exception):
        pass

    async def send(job: ChunkJob, data: bytes) -> None:
        if job.chunk == 1:
            # let the read-ahead pin chunk 2 before failing
            with trio.move_on_after(2):
                while 2 not in loads:
                    await trio.sleep(0.001)
            raise Gone("peer went away")

    async def finish() -> None:
        raise AssertionError("finish after a failed send")

    with pytest.raises(Gone):
        await send_chunks(cache, [_job(i, loads) for i in range(5)], send, finish)
    assert cache.pinned_bytes == 0


async def test_cancelling_mid_load_leaves_nothing_pinned() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []
    gate = threading.Event()

    async def send(job: ChunkJob, data: bytes) -> None:
        pass

    async def finish() -> None:
        pass

    async def open_gate_later() -> None:
        await trio.sleep(0.2)
        gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_later)
        # cancelled while chunk 0 is loading in its thread (which runs to the end)
        with trio.move_on_after(0.05) as scope:
            await send_chunks(cache, [_job(0, loads, gate=gate)], send, finish)
    assert scope.cancelled_caught
    assert cache.pinned_bytes == 0
    # and the key is not left half-loaded: the next request loads it afresh
    await send_chunks(cache, [_job(0, loads)], send, finish)
    assert cache.pinned_bytes == 0


async def test_prefetch_warms_the_cache_for_the_next_request() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []

    async def send(job: ChunkJob, data: bytes) -> None:
        pass

    async def finish() -> None:
        pass

    await send_chunks(cache, [_job(0, loads)], send, finish, prefetch=_job(1, loads))
    assert loads == [0, 1] and cache.pinned_bytes == 0
    hits = cache.hits
    await send_chunks(cache, [_job(1, loads)], send, finish)
    assert loads == [0, 1], "the prefetched chunk was read again"
    assert cache.hits == hits + 1


async def test_a_failing_prefetch_does_not_fail_the_request() -> None:
    cache = ChunkCache(10 * SIZE, max_reads=4)
    loads: list[int] = []
    finished: list[bool] = []

    async def send(job: ChunkJob, data: bytes) -> None:
        pass

    async def finish() -> None:
        finished.append(True)

    await send_chunks(cache, [_job(0, loads)], send, finish, prefetch=_job(1, loads, bad=True))
    assert finished == [True] and cache.pinned_bytes == 0
