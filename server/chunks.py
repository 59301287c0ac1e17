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

import contextlib
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from pathlib import Path
from typing import Final

import attrs
import trio
from fleetpush.protocol import IntegrityError, Manifest, hashing
from fleetpush.protocol.limits import MAX_CHUNK_SIZE

from .errors import ChunkUnavailable

#: The cache never gets less room than this, so reads never serialise.
MIN_CACHE_BYTES: Final = 2 * MAX_CHUNK_SIZE
MANIFEST_CACHE_SIZE: Final = 32
#: Chunks a get_chunks stream loads ahead of the one it is sending.
READ_AHEAD: Final = 2


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

    @property
    def pinned_bytes(self) -> int:
        """Bytes of chunks being loaded or sent (not evictable)."""
        return sum(e.size for e in self._entries.values() if e.refs)

    async def pin(self, key: Hashable, size: int, load: Callable[[], bytes]) -> _Entry:
        """The chunk for ``key`` (``.data``), loaded with ``load`` in a thread on a miss.

        The entry stays pinned (not evictable) until :meth:`unpin`. Concurrent
        pins of one key share one load. Raises whatever ``load`` raises (to
        every task waiting for that key).
        """
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                entry.refs += 1
                try:
                    await entry.ready.wait()
                except BaseException:
                    self.unpin(entry)
                    raise
                if entry.error is not None:
                    self.unpin(entry)
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
            self.unpin(entry)
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

    def unpin(self, entry: _Entry) -> None:
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


@attrs.frozen
class ChunkJob:
    """One chunk to send: its cache key, size, loader, and a name for errors."""

    file: int
    chunk: int
    key: Hashable
    size: int
    load: Callable[[], bytes]
    what: str


async def send_chunks(
    cache: ChunkCache,
    jobs: Sequence[ChunkJob],
    send: Callable[[ChunkJob, bytes], Awaitable[None]],
    finish: Callable[[], Awaitable[None]],
    *,
    prefetch: ChunkJob | None = None,
    read_ahead: int = READ_AHEAD,
) -> None:
    """Send ``jobs`` in order, then call ``finish``; loads run ahead of the sends.

    Reading and hashing a chunk (a worker thread) overlaps with sending the one
    before it, so a single download keeps the disk, the hash and the socket
    busy at once instead of taking turns. Up to ``read_ahead`` chunks are
    pinned in the cache at a time, so read-ahead stays inside its memory
    budget. ``prefetch``, the chunk a sequential reader asks for next, is then
    loaded into the cache (not pinned) while ``finish`` answers the request:
    the next ``get_chunks`` starts on a cache hit instead of a cold read.

    A chunk that cannot be loaded raises :class:`ChunkUnavailable` once every
    chunk before it has been sent, exactly as without read-ahead.
    """
    send_ch, recv_ch = trio.open_memory_channel[tuple[ChunkJob, _Entry | None, Exception | None]](
        max(0, read_ahead - 1)
    )

    async def produce() -> None:
        async with send_ch:
            for job in jobs:
                try:
                    entry = await cache.pin(job.key, job.size, job.load)
                except (IntegrityError, OSError) as e:
                    await send_ch.send((job, None, e))
                    return
                try:
                    await send_ch.send((job, entry, None))
                except BaseException:
                    cache.unpin(entry)
                    raise
        if prefetch is not None:
            # A warm-up only: a failure here is the next request's to report.
            with contextlib.suppress(IntegrityError, OSError):
                cache.unpin(await cache.pin(prefetch.key, prefetch.size, prefetch.load))

    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            async for job, entry, error in recv_ch:
                if entry is None:
                    raise ChunkUnavailable(
                        f"{job.what} failed verification on the releaser"
                    ) from error
                try:
                    assert entry.data is not None
                    await send(job, entry.data)
                finally:
                    cache.unpin(entry)
            await finish()
        except Exception as e:  # re-raised below, outside the nursery: not in a group
            failure = e
            nursery.cancel_scope.cancel()
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        finally:
            # Chunks read ahead but never sent must not stay pinned. The
            # producer is cancelled by now, so nothing more arrives.
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    _, entry, _ = recv_ch.receive_nowait()
                    if entry is not None:
                        cache.unpin(entry)
            recv_ch.close()
    if failure is not None:
        raise failure


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
