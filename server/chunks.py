"""Serving chunks: batched reads from disk and a shared, bounded chunk cache.

A chunk is served from the releaser's own store without hashing it again: its
digest was verified when the release was published (specs/PROTOCOL.md §7.4),
the device verifies every chunk before writing it, and the background scrub
(scrub.py) notices bytes that changed at rest. Reads run in worker threads
(``trio.to_thread``), at most ``max_reads`` at once; one read job fills a run
of consecutive chunks of one file (up to :data:`RUN_BYTES`) with one
``preadv`` into buffers the cache reuses (chunk_io.py), instead of a thread
hop and a fresh allocation per chunk (issue 14, item 3).

:class:`ChunkCache` holds chunks for every download at once: 1000
devices fetching the same release read each chunk once. It is also
the server's memory budget for chunk data: a chunk being sent is *pinned* (not
evictable), and a new chunk is read only when the cached plus pinned bytes
leave room for it; otherwise the reader waits until a send finishes. So
however many devices download, chunk data in memory stays under
``max_bytes`` (plus at most one chunk if a single chunk is larger); the
spare buffers it keeps for reuse count against the same budget.

Fair shares (issue 10, item 5): 20 peers that asked for chunks and never read
used to hold the whole cache pinned until their 30 s send deadline, and an
honest 96 MiB download took 27 s instead of 0.2 s. Now each session has a
:class:`CacheShare`: it pins at most ``max_bytes / SHARE_DIVISOR`` (at least
one chunk), and under pressure (more than half the cache pinned) it reads
ahead nothing. A reader that finds no room reclaims it: every session whose
send has been blocked for longer than ``stall_timeout`` is closed (its bye
says why) and its pins are released at once. Every wait for room has a
deadline (``wait_timeout``): past it the request is answered ``UNAVAILABLE``,
"busy". A chunk that cannot be read is reported as a read error, one whose
file is shorter than its manifest says as a verification failure (item 7).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Final

import attrs
import trio
from fleetpush.protocol import CloseCode, IntegrityError, Manifest
from fleetpush.protocol.limits import MAX_CHUNK_SIZE

from fleetpush.net.peer import PeerClosed

from .chunk_io import BufferPool, ChunkSource
from .errors import ChunkUnavailable, ObjectStoreError

#: The cache never gets less room than this, so reads never serialise.
MIN_CACHE_BYTES: Final = 2 * MAX_CHUNK_SIZE
MANIFEST_CACHE_SIZE: Final = 32
#: Chunks a get_chunks stream loads ahead of the one it is sending.
READ_AHEAD: Final = 2
#: The most bytes of consecutive chunks one worker-thread job reads.
RUN_BYTES: Final = 4 * 1024 * 1024
#: A session may pin at most this fraction of the cache (issue 10, item 5).
SHARE_DIVISOR: Final = 4
#: How often a reader waiting for room looks again for stalled senders.
RECLAIM_POLL: Final = 0.05


class CacheBusy(Exception):
    """No room in the chunk cache within the wait deadline."""


class CacheShare:
    """One session's part of the chunk cache (trio thread only).

    ``close(reason)`` must close the session without waiting (the releaser
    starts the bye in the session's own task group); the cache calls it when
    this session's send has stalled while other readers wait for room.
    """

    def __init__(self, close: Callable[[int, str], None] | None = None) -> None:
        self.pinned = 0
        self._close = close
        #: when the send in progress started (None: not sending)
        self.sending_since: float | None = None
        self._send_scope: trio.CancelScope | None = None
        self.reclaimed = False
        self._freed = trio.Event()

    def _add(self, size: int) -> None:
        self.pinned += size

    def _remove(self, size: int) -> None:
        self.pinned -= size
        self._freed.set()
        self._freed = trio.Event()

    def reclaim(self, reason: str) -> None:
        """Close this session and cancel its stalled send, which releases its pins."""
        if self.reclaimed:
            return
        self.reclaimed = True
        if self._close is not None:
            # Runs in another session's task: a session already ending (its
            # task group closed) must not fail that session's request.
            with contextlib.suppress(RuntimeError):
                self._close(CloseCode.TIMEOUT, reason)
        if self._send_scope is not None:
            self._send_scope.cancel()


#: The share of the session this task serves; the releaser sets it for each
#: connection's tasks (app.py), so chunk requests of one session share one budget.
current_share: contextvars.ContextVar[CacheShare | None] = contextvars.ContextVar(
    "fleetpush_chunk_share", default=None
)


class _Entry:
    __slots__ = ("buffer", "data", "error", "key", "ready", "refs", "shares", "size")

    def __init__(self, key: Hashable, size: int) -> None:
        self.key = key
        self.size = size
        self.refs = 1
        self.shares: list[CacheShare] = []
        self.data: bytes | bytearray | None = None
        #: the pool buffer ``data`` is, given back when the entry is evicted
        self.buffer: bytearray | None = None
        self.error: BaseException | None = None
        self.ready = trio.Event()


class ChunkCache:
    """LRU cache of verified chunks with pinning; see the module docstring."""

    def __init__(
        self,
        max_bytes: int,
        max_reads: int,
        *,
        stall_timeout: float = 5.0,
        wait_timeout: float = 30.0,
        store_reads: int = 16,
    ) -> None:
        self.max_bytes = max(max_bytes, MIN_CACHE_BYTES)
        #: most bytes one session may pin (at least one chunk always fits).
        self.share_bytes = self.max_bytes // SHARE_DIVISOR
        self.stall_timeout = stall_timeout
        self.wait_timeout = wait_timeout
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._used = 0
        self._pinned = 0
        self._freed = trio.Event()
        self._limiter = trio.CapacityLimiter(max_reads)
        # Object store reads (artifacts.py) wait on the network, not the disk:
        # their own threads, so a store that hangs cannot take the disk's.
        self._store_limiter = trio.CapacityLimiter(store_reads)
        self._pool = BufferPool()
        self._shares: set[CacheShare] = set()
        self.hits = 0
        self.misses = 0
        #: the most bytes ever pinned at once (must stay within max_bytes)
        self.peak_pinned = 0
        #: sessions closed because their send stalled while others waited
        self.reclaimed = 0
        #: requests answered "busy": no room within wait_timeout
        self.busy = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def spare_bytes(self) -> int:
        """Bytes of read buffers kept for reuse (within max_bytes with the cached chunks)."""
        return self._pool.bytes

    @property
    def pinned_bytes(self) -> int:
        """Bytes of chunks being loaded or sent (not evictable)."""
        return self._pinned

    @property
    def under_pressure(self) -> bool:
        """More than half the cache is pinned: sessions read ahead nothing."""
        return self._pinned * 2 > self.max_bytes

    def room_for(self, share: CacheShare, size: int) -> bool:
        """Whether ``share`` may pin ``size`` more bytes now (always, if it pins nothing)."""
        if share.pinned == 0:
            return True
        if self.under_pressure:
            return False
        return share.pinned + size <= self.share_bytes

    @contextlib.contextmanager
    def sending(self, share: CacheShare) -> Iterator[trio.CancelScope]:
        """Mark ``share``'s send in progress; the scope is cancelled if it is reclaimed."""
        scope = trio.CancelScope()
        share.sending_since = trio.current_time()
        share._send_scope = scope
        self._shares.add(share)
        try:
            yield scope
        finally:
            share.sending_since = None
            share._send_scope = None
            self._shares.discard(share)

    def _reclaim_stalled(self) -> None:
        now = trio.current_time()
        for share in list(self._shares):
            since = share.sending_since
            if since is not None and now - since >= self.stall_timeout and not share.reclaimed:
                self.reclaimed += 1
                share.reclaim(
                    f"did not read its chunks for {self.stall_timeout:g} s "
                    "while other downloads waited"
                )

    async def _wait_for_room(self, deadline: float) -> None:
        """Wait until something is unpinned, reclaiming stalled senders. Raises CacheBusy."""
        self._reclaim_stalled()
        if trio.current_time() >= deadline:
            self.busy += 1
            raise CacheBusy(f"no room in the chunk cache for {self.wait_timeout:g} s")
        with trio.move_on_at(min(deadline, trio.current_time() + RECLAIM_POLL)):
            await self._freed.wait()

    async def pin(
        self,
        key: Hashable,
        size: int,
        load: Callable[[], bytes],
        share: CacheShare | None = None,
        *,
        remote: bool = False,
    ) -> _Entry:
        """The chunk for ``key`` (``.data``), loaded with ``load`` in a thread on a miss.

        The entry stays pinned (not evictable) until :meth:`unpin`. Concurrent
        pins of one key share one load. Raises whatever ``load`` raises (to
        every task waiting for that key), :class:`CacheBusy` if no room came
        within ``wait_timeout``.
        """
        entry = await self._reserve(key, size)
        if entry.data is None:
            self._pool.trim(self.max_bytes - self._used)
            await self._load([entry], lambda: [load()], remote=remote)
        if share is not None:
            share._add(size)
            entry.shares.append(share)
        return entry

    async def pin_run(self, jobs: Sequence[ChunkJob], share: CacheShare) -> list[_Entry]:
        """Pin ``jobs[0]`` and as many of the jobs after it as one read can fill.

        Consecutive chunks of one file that are not cached are read by one
        worker-thread job (one ``preadv``, pool buffers), up to
        :data:`RUN_BYTES`, while the cache and ``share`` have room for them
        without waiting. Returns the pinned entries of ``jobs[:k]``, k >= 1;
        raises like :meth:`pin` (the whole run fails together).
        """
        first = jobs[0]
        if first.source is None:
            assert first.load is not None
            return [await self.pin(first.key, first.size, first.load, share, remote=first.remote)]
        entry = await self._reserve(first.key, first.size)
        run = [entry]
        if entry.data is None:
            end = first.source.offset + first.size
            total = first.size
            for job in jobs[1:]:
                source = job.source
                if (
                    source is None
                    or source.path != first.source.path
                    or source.store is not first.source.store
                    or source.offset != end
                    or job.key in self._entries
                    or total + job.size > RUN_BYTES
                    or self.under_pressure
                    or share.pinned + total + job.size > self.share_bytes
                    or not self._make_room(job.size)
                ):
                    break
                run.append(self._new_entry(job.key, job.size))
                end += job.size
                total += job.size
            await self._load_run(first.source, run)
        for e in run:
            share._add(e.size)
            e.shares.append(share)
        return run

    async def _load_run(self, source: ChunkSource, run: list[_Entry]) -> None:
        buffers = [self._pool.take(e.size) for e in run]
        # Spare buffers count against the budget too: keep only what is left
        # of it now that the run's entries are in (after taking theirs).
        self._pool.trim(self.max_bytes - self._used)
        for e, buffer in zip(run, buffers, strict=True):
            e.buffer = buffer

        def read() -> list[bytes | bytearray]:
            source.read_into(buffers)
            return list(buffers)

        await self._load(run, read, remote=source.store is not None)

    async def _reserve(self, key: Hashable, size: int) -> _Entry:
        """A pinned entry for ``key``: a loaded hit, or a new one (``data`` None) to load."""
        deadline = trio.current_time() + self.wait_timeout
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                self._ref(entry)
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
                return self._new_entry(key, size)
            await self._wait_for_room(deadline)

    def _new_entry(self, key: Hashable, size: int) -> _Entry:
        entry = _Entry(key, size)
        self._entries[key] = entry
        self._used += size
        self._pinned += size
        self.peak_pinned = max(self.peak_pinned, self._pinned)
        self.misses += 1
        return entry

    async def _load(
        self,
        run: list[_Entry],
        load: Callable[[], Sequence[bytes | bytearray]],
        *,
        remote: bool = False,
    ) -> None:
        """Fill the new entries ``run`` with ``load`` in a worker thread; on failure
        every task waiting for one of them gets the error and they leave the cache."""
        try:
            limiter = self._store_limiter if remote else self._limiter
            loaded = await trio.to_thread.run_sync(load, limiter=limiter)
        except BaseException as e:
            for entry in run:
                entry.error = e
                del self._entries[entry.key]
                self._used -= entry.size
                self._give_back(entry)
                entry.ready.set()
                self.unpin(entry)
            raise
        for entry, data in zip(run, loaded, strict=True):
            entry.data = data
            entry.ready.set()

    def _give_back(self, entry: _Entry) -> None:
        # Eviction moves bytes from the cache to the pool, so the two stay
        # within max_bytes; new entries take their buffers and trim the pool
        # back to what the budget leaves in the same step (_load_run, pin).
        if entry.buffer is not None:
            self._pool.give(entry.buffer, self.max_bytes)
            entry.buffer = entry.data = None  # its bytes are the next read's now

    def _make_room(self, size: int) -> bool:
        if self._used + size <= self.max_bytes:
            return True
        # Collect only the oldest unpinned entries that make room, not every
        # one: with content-defined chunks the cache holds thousands of
        # entries and this runs per chunk read (issue 14: 10% of the
        # releaser's trio thread went to a full scan here).
        need = self._used + size - self.max_bytes
        victims = []
        for key, e in self._entries.items():
            if e.refs == 0:
                victims.append(key)
                need -= e.size
                if need <= 0:
                    break
        for key in victims:
            entry = self._entries.pop(key)
            self._used -= entry.size
            self._give_back(entry)
        if self._used + size <= self.max_bytes:
            return True
        return self._used == 0  # a chunk larger than the whole budget, alone

    def _ref(self, entry: _Entry) -> None:
        entry.refs += 1
        if entry.refs == 1:
            self._pinned += entry.size
            self.peak_pinned = max(self.peak_pinned, self._pinned)

    def unpin(self, entry: _Entry, share: CacheShare | None = None) -> None:
        if share is not None and share in entry.shares:
            entry.shares.remove(share)
            share._remove(entry.size)
        entry.refs -= 1
        if entry.refs == 0:
            self._pinned -= entry.size
            self._freed.set()
            self._freed = trio.Event()


@attrs.frozen(kw_only=True)
class ChunkJob:
    """One chunk to send: its cache key, size, where it comes from, and a name for errors.

    A chunk of the store has a ``source`` (read in runs with its neighbours);
    ``load`` (in a worker thread) is for chunks that come from elsewhere.
    """

    file: int
    chunk: int
    key: Hashable
    size: int
    what: str
    source: ChunkSource | None = None
    load: Callable[[], bytes] | None = None
    #: ``load`` reads from an object store (its reads have their own limiter)
    remote: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.source is None) == (self.load is None):
            raise ValueError("a ChunkJob needs exactly one of source and load")


async def send_chunks(
    cache: ChunkCache,
    jobs: Sequence[ChunkJob],
    send: Callable[[ChunkJob, bytes | bytearray], Awaitable[None]],
    finish: Callable[[], Awaitable[None]],
    *,
    prefetch: ChunkJob | Sequence[ChunkJob] | None = None,
    read_ahead: int = READ_AHEAD,
    share: CacheShare | None = None,
    send_run: Callable[[Sequence[ChunkJob], list[bytes | bytearray]], Awaitable[None]]
    | None = None,
) -> None:
    """Send ``jobs`` in order, then call ``finish``; loads run ahead of the sends.

    Reading a run of chunks (a worker thread, :meth:`ChunkCache.pin_run`)
    overlaps with sending the chunks before it, so a single download keeps the
    disk and the socket busy at once instead of taking turns. Up to
    ``read_ahead`` runs are pinned in the cache at a time (a chunk with a
    ``load`` is a run of one), and never more than the session's share
    (``share``, default :data:`current_share`; see the module docstring), so
    read-ahead stays inside its memory budget. ``prefetch``, the chunk (or
    the consecutive chunks, read as one run) a sequential reader asks for
    next, is then loaded into the cache (not pinned) while ``finish`` answers
    the request: the next ``get_chunks`` starts on cache hits instead of a
    cold read.

    With ``send_run``, each run read together is sent with one call instead
    of ``send`` per chunk (a whole run in one write where the link allows).

    A chunk that cannot be loaded raises :class:`ChunkUnavailable` once every
    chunk before it has been sent, exactly as without read-ahead; its message
    says whether the bytes did not match the manifest, could not be read, or the
    cache was busy. Raises ``PeerClosed`` if this session was reclaimed
    because its send stalled.
    """
    if share is None:
        share = current_share.get() or CacheShare()
    # One item per read: a run of consecutive chunks (one worker-thread job),
    # or the error that ends the stream at the job that failed.
    send_ch, recv_ch = trio.open_memory_channel[
        tuple[Sequence[ChunkJob], list[_Entry] | None, Exception | None]
    ](max(0, read_ahead - 1))

    async def produce() -> None:
        async with send_ch:
            i = 0
            while i < len(jobs):
                job = jobs[i]
                try:
                    deadline = trio.current_time() + cache.wait_timeout
                    while not cache.room_for(share, job.size):
                        if trio.current_time() >= deadline:
                            cache.busy += 1
                            raise CacheBusy(
                                f"no room for this session for {cache.wait_timeout:g} s"
                            )
                        with trio.move_on_at(deadline):
                            await share._freed.wait()
                    run = await cache.pin_run(jobs[i:], share)
                except (IntegrityError, OSError, CacheBusy, ObjectStoreError) as e:
                    await send_ch.send(([job], None, e))
                    return
                try:
                    await send_ch.send((jobs[i : i + len(run)], run, None))
                except BaseException:
                    for entry in run:
                        cache.unpin(entry, share)
                    raise
                i += len(run)
        warmup = [prefetch] if isinstance(prefetch, ChunkJob) else list(prefetch or ())
        if warmup and not cache.under_pressure:
            # A warm-up only: a failure here is the next request's to report.
            # One read (a run), so the next request starts on cache hits.
            with contextlib.suppress(IntegrityError, OSError, CacheBusy, ObjectStoreError):
                warm = CacheShare()
                for entry in await cache.pin_run(warmup, warm):
                    cache.unpin(entry, warm)

    failure: BaseException | None = None
    held: list[_Entry] = []  # pinned entries received and not yet sent
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            async for run_jobs, run, error in recv_ch:
                if run is None:
                    raise ChunkUnavailable(_unavailable(run_jobs[0], error)) from error
                held = list(run)
                if send_run is not None:
                    data = [entry.data for entry in held if entry.data is not None]
                    with cache.sending(share) as scope:
                        await send_run(run_jobs, data)
                    if scope.cancelled_caught:
                        raise PeerClosed(CloseCode.TIMEOUT, "stopped reading its chunks")
                    for entry in held:
                        cache.unpin(entry, share)
                    held.clear()
                    continue
                for job in run_jobs:
                    entry = held[0]
                    try:
                        assert entry.data is not None
                        with cache.sending(share) as scope:
                            await send(job, entry.data)
                        if scope.cancelled_caught:
                            raise PeerClosed(CloseCode.TIMEOUT, "stopped reading its chunks")
                    finally:
                        cache.unpin(held.pop(0), share)
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
            for entry in held:
                cache.unpin(entry, share)
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    _, run, _ = recv_ch.receive_nowait()
                    for entry in run or ():
                        cache.unpin(entry, share)
            recv_ch.close()
    if failure is not None:
        raise failure


def _unavailable(job: ChunkJob, error: Exception | None) -> str:
    """What to tell the device about a chunk that could not be loaded.

    An I/O error is not a verification failure: at the fd limit, EMFILE used
    to be reported as "failed verification on the releaser" (issue 10, item 7).
    """
    if isinstance(error, CacheBusy):
        return f"{job.what}: the releaser is busy ({error}); try again"
    if isinstance(error, ObjectStoreError):
        return f"{job.what} could not be read from the object store: {error}"
    if isinstance(error, OSError):
        return f"{job.what} could not be read on the releaser: {error.strerror or error}"
    return f"{job.what} failed verification on the releaser"


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
