"""Serving chunks: verified reads from disk and a shared, bounded chunk cache.

A chunk is served only after its bytes on disk hashed to the digest in the
release's signed manifest (specs/PROTOCOL.md §7.4). Reading and hashing run
in worker threads (``trio.to_thread``), at most ``max_reads`` at once, and
never touch more than one chunk of a file.

:class:`ChunkCache` holds verified chunks for every download at once: 1000
devices fetching the same release read and hash each chunk once. It is also
the server's memory budget for chunk data: a chunk being sent is *pinned* (not
evictable), and a new chunk is read only when the cached plus pinned bytes
leave room for it; otherwise the reader waits until a send finishes. So
however many devices download, chunk data in memory stays under
``max_bytes`` (plus at most one chunk if a single chunk is larger).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio
from fleetpush.protocol import IntegrityError, Manifest, hashing
from fleetpush.protocol.limits import MAX_CHUNK_SIZE

#: The cache never gets less room than this, so reads never serialise.
MIN_CACHE_BYTES: Final = 2 * MAX_CHUNK_SIZE
MANIFEST_CACHE_SIZE: Final = 32


class _Entry:
    __slots__ = ("data", "error", "ready", "refs", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.refs = 1
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.ready = trio.Event()


class ChunkCache:
    """LRU cache of verified chunks with pinning; see the module docstring."""

    def __init__(self, max_bytes: int, max_reads: int) -> None:
        self.max_bytes = max(max_bytes, MIN_CACHE_BYTES)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._used = 0
        self._freed = trio.Event()
        self._limiter = trio.CapacityLimiter(max_reads)
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @asynccontextmanager
    async def lease(
        self, key: Hashable, size: int, load: Callable[[], bytes]
    ) -> AsyncIterator[bytes]:
        """Yield the chunk for ``key``, loading it with ``load`` (in a thread) on a miss.

        Concurrent leases of one key share one load. Raises whatever ``load``
        raises (to every task waiting for that key).
        """
        entry = await self._acquire(key, size, load)
        try:
            assert entry.data is not None
            yield entry.data
        finally:
            self._release(entry)

    async def _acquire(self, key: Hashable, size: int, load: Callable[[], bytes]) -> _Entry:
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                entry.refs += 1
                try:
                    await entry.ready.wait()
                except BaseException:
                    self._release(entry)
                    raise
                if entry.error is not None:
                    self._release(entry)
                    raise entry.error
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            if self._make_room(size):
                break
            await self._freed.wait()
        entry = _Entry(size)
        self._entries[key] = entry
        self._used += size
        self.misses += 1
        try:
            entry.data = await trio.to_thread.run_sync(load, limiter=self._limiter)
        except BaseException as e:
            entry.error = e
            del self._entries[key]
            self._used -= size
            entry.ready.set()
            self._release(entry)
            raise
        entry.ready.set()
        return entry

    def _make_room(self, size: int) -> bool:
        if self._used + size <= self.max_bytes:
            return True
        for key in [k for k, e in self._entries.items() if e.refs == 0]:
            entry = self._entries.pop(key)
            self._used -= entry.size
            if self._used + size <= self.max_bytes:
                return True
        return self._used == 0  # a chunk larger than the whole budget, alone

    def _release(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs == 0:
            self._freed.set()
            self._freed = trio.Event()


def read_verified_chunk(
    path: Path, offset: int, length: int, algorithm: str, expected: bytes
) -> bytes:
    """Read ``length`` bytes at ``offset`` and check their digest (runs in a thread).

    Raises :class:`IntegrityError` if the bytes are short or hash differently,
    ``OSError`` if the file cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        data = os.pread(fd, length, offset)
        while len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) != length:
        raise IntegrityError(
            f"{path}: {len(data)} bytes at offset {offset}, manifest says {length}"
        )
    if hashing.digest(algorithm, data) != expected:
        raise IntegrityError(f"{path}: chunk at offset {offset} does not match its manifest digest")
    return data


class ManifestCache:
    """Parsed manifests of published releases (immutable once published), LRU-bounded."""

    def __init__(self, size: int = MANIFEST_CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[str, Manifest] = OrderedDict()

    def get(self, release_dir: str, signed: bytes) -> Manifest:
        # A release dir is a fresh random token per release: it names its bytes.
        key = release_dir
        manifest = self._items.get(key)
        if manifest is None:
            manifest = Manifest.from_bytes(signed)
            self._items[key] = manifest
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return manifest
