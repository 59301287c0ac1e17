"""The chunk cache's buffer pool (server/chunk_io.py).

A device asking for 64 chunks per request (issue 14's batched download)
took every pooled buffer of one size; the emptied size stayed in the pool
as an empty list, and the next trim() popped from it: IndexError in the
releaser's get_chunks. The pool must never keep an empty size.
"""

from __future__ import annotations

from fleetpush.server.chunk_io import BufferPool


def test_taking_every_buffer_of_a_size_then_trimming() -> None:
    pool = BufferPool()
    for _ in range(3):
        pool.give(bytearray(1024), limit=1 << 20)
    pool.give(bytearray(512), limit=1 << 20)
    taken = [pool.take(1024) for _ in range(3)]
    assert [len(b) for b in taken] == [1024] * 3
    assert pool.bytes == 512
    pool.trim(0)  # used to raise IndexError: pop from empty list
    assert pool.bytes == 0
    assert len(pool.take(512)) == 512  # a fresh one: the pool is empty


def test_trim_keeps_at_most_the_limit() -> None:
    pool = BufferPool()
    for size in (100, 200, 300, 300):
        pool.give(bytearray(size), limit=10_000)
    assert pool.bytes == 900
    pool.trim(350)
    assert 0 < pool.bytes <= 350
    # What is left is still handed out, and accounted for.
    before = pool.bytes
    kept = pool.take(300) if before >= 300 else pool.take(100)
    assert pool.bytes == before - len(kept)
