"""Reading chunks from the release store: batched ``preadv`` into reused buffers.

The releaser serves chunks from its own store, whose digests were verified
when the release was published (publish.py, specs/PROTOCOL.md §7.4); the
device verifies every chunk again before it writes it. So serving does not
hash (issue 14, item 3: re-hashing was a quarter of the releaser's CPU per
GiB served); integrity at rest is the background scrub's job (scrub.py).

A read of consecutive chunks of one file is one ``open`` and one ``preadv``
into buffers taken from a :class:`BufferPool`, so that serving a GiB neither
allocates (and page-faults) a fresh megabyte per chunk nor pays a thread hop
per chunk. These functions run in worker threads and touch no trio state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import attrs
from fleetpush.protocol import IntegrityError, hashing

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class RangeReader(Protocol):
    """An object store's ranged read (artifacts.S3Store): one GET for a run of chunks."""

    def read_into(self, name: str, offset: int, buffers: Sequence[bytearray]) -> None: ...


@attrs.frozen
class ChunkSource:
    """Where a chunk's bytes lie in the store: chunks of one file that follow
    each other are read together (chunks.ChunkCache.pin_run).

    ``store`` None: ``path`` is a file on disk; else ``path`` names an object
    in that store (artifacts.py, issue 15), read with one ranged GET per run.
    """

    path: Path
    offset: int
    store: RangeReader | None = attrs.field(default=None, eq=False)

    def read_into(self, buffers: Sequence[bytearray]) -> None:
        """Fill ``buffers`` from ``offset`` on (in a worker thread).

        Raises IntegrityError, OSError, or ObjectStoreError (a remote store).
        """
        if self.store is None:
            read_into(self.path, self.offset, buffers)
        else:
            self.store.read_into(self.path.as_posix(), self.offset, buffers)


class BufferPool:
    """Chunk buffers given back by evicted cache entries, kept for the next read.

    Owned by the chunk cache (trio thread only), which bounds it: the pool
    plus the cached chunks stay within the cache's memory budget (``trim``).
    Buffers are reused only at their exact size; a release has one chunk size
    (and a shorter last chunk per file), so nearly every read finds one.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self.bytes = 0

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if not free:
            return bytearray(size)
        self.bytes -= size
        buffer = free.pop()
        if not free:  # no empty lists left behind: trim() pops from the first one
            del self._free[size]
        return buffer

    def give(self, buffer: bytearray, limit: int) -> None:
        """Keep ``buffer`` unless the pool would then hold more than ``limit`` bytes."""
        if self.bytes + len(buffer) <= limit:
            self._free.setdefault(len(buffer), []).append(buffer)
            self.bytes += len(buffer)

    def trim(self, limit: int) -> None:
        """Drop buffers until the pool holds at most ``limit`` bytes."""
        while self.bytes > max(limit, 0) and self._free:
            size, free = next(iter(self._free.items()))
            free.pop()
            self.bytes -= size
            if not free:
                del self._free[size]


def read_into(path: Path, offset: int, buffers: Sequence[bytearray]) -> None:
    """Fill ``buffers`` with the file's bytes from ``offset`` on (one ``preadv`` as a rule).

    Raises :class:`IntegrityError` if the file ends first (the store no longer
    matches its manifest), ``OSError`` if it cannot be read.
    """
    total = sum(len(b) for b in buffers)
    views = [memoryview(b) for b in buffers]
    done = 0
    fd = os.open(path, _OPEN_FLAGS)
    try:
        while done < total:
            n = os.preadv(fd, views, offset + done)
            if n == 0:
                break
            done += n
            views = _after(views, n)
    finally:
        os.close(fd)
    if done < total:
        raise IntegrityError(f"{path}: {done} bytes at offset {offset}, manifest says {total}")


def _after(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` once ``n`` bytes were read into them."""
    for i, view in enumerate(views):
        if n < len(view):
            return [view[n:], *views[i + 1 :]]
        n -= len(view)
    return []


def read_chunk(path: Path, offset: int, length: int) -> bytes:
    """The ``length`` bytes at ``offset``, unverified (a load for one chunk, in a thread).

    Raises :class:`IntegrityError` (the file is short), ``OSError``.
    """
    buffer = bytearray(length)
    read_into(path, offset, [buffer])
    return bytes(buffer)


def read_verified_chunk(
    path: Path, offset: int, length: int, algorithm: str, expected: bytes
) -> bytes:
    """Read ``length`` bytes at ``offset`` and check their digest (runs in a thread).

    The scrub's check (scrub.py). Raises :class:`IntegrityError` if the bytes
    are short or hash differently, ``OSError`` if the file cannot be read.
    """
    data = read_chunk(path, offset, length)
    if hashing.digest(algorithm, data) != expected:
        raise IntegrityError(f"{path}: chunk at offset {offset} does not match its manifest digest")
    return data
