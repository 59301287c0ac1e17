"""Verified, resumable, windowed download of a release into the staging area.

The downloader fills ``<state>/updates/<version>/files/<path>`` (layout.py) for
one *verified* manifest (fleetpush.protocol.trust has already passed it):

1. **Plan** (in a worker thread). For every file, chunks already present in
   the staged file are re-verified against the signed per-chunk digests (this
   is what makes a resume after a dropped link or ``kill -9`` fetch only the
   missing or damaged chunks). Chunks still missing are looked for locally: in
   the installed file with the same whole-file digest (from the installed
   manifest), or else the installed file at the same path; a chunk whose
   digest matches is copied, not downloaded. So an unchanged file costs no
   network at all, and a grown log file only its new tail.
2. **Fetch**. The remaining chunks are asked for in ``get_chunks`` requests
   of ``chunks_per_request``, with up to ``window`` chunks outstanding, so the
   releaser always has the next request queued (specs/PROTOCOL.md §7.3). Each
   chunk is hashed and compared with its signed digest *before* it is written
   with ``pwrite`` at its offset; both happen in worker threads (hashlib and
   ``os.pwrite`` release the GIL) while the trio thread keeps receiving.
3. **Finish**. A file whose every chunk has been verified is checked for its
   signed size, fsynced and closed. Its whole-file digest is *not* hashed
   again: chunk *i* covers a fixed byte range (specs/PROTOCOL.md §7.3) and
   every range has matched its signed digest, so the bytes are exactly the
   signed ones; the releaser refuses to publish a manifest whose file digest
   is not the hash of those same bytes (§7.2). That saves a full hash pass
   over every release, the largest cost of a download after the network.

Memory stays flat: at most ``window`` chunks are in flight and every buffer
is written and dropped as it arrives. Nothing is ever written outside the
staging tree: paths come from the verified manifest and are opened with
``fsutil.safe_open_for_write`` (no ``..``, no symlinks followed).

Raises, all under :class:`DownloadError` or the trust tree:
:class:`fleetpush.protocol.errors.IntegrityError` (a chunk or file does not
match the signed manifest: nothing of it is kept), :class:`DiskFullError`,
:class:`UnsafePathError`, :class:`FilesystemError`, and
:class:`DownloadError` for the connection failing or the releaser refusing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import trio
from fleetpush.protocol.errors import IntegrityError, ManifestError, RpcError
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.manifest import FileEntry, Manifest
from fleetpush.protocol.messages import GetChunks, SignedManifest

from fleetpush.net.peer import ChunkStream, Peer, TransportError

from .errors import FilesystemError, UpdaterError, wrap_oserror
from .fsutil import (
    atomic_write_bytes,
    check_free_space,
    open_for_read,
    safe_open_for_write,
)
from .layout import StateLayout
from .staging import encode_signed_manifest, read_signed_manifest

log = logging.getLogger("fleetpush.client.download")

#: Head room kept free beyond the bytes a download still needs.
FREE_SPACE_MARGIN: Final = 4 * 1024 * 1024

ProgressCallback = Callable[[int, int], None]


class DownloadError(UpdaterError):
    """The download could not complete (link lost, releaser refused); resumable."""


# --- results -----------------------------------------------------------------------------


@attrs.define
class DownloadResult:
    """What one download did; ``chunks_fetched`` counts chunks asked of the releaser."""

    version: str
    bytes_total: int = 0
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    bytes_copied: int = 0
    chunks_total: int = 0
    chunks_fetched: int = 0
    chunks_resumed: int = 0
    chunks_copied: int = 0
    elapsed: float = 0.0


@attrs.define(eq=False)
class _File:
    index: int
    entry: FileEntry
    #: chunk indices still to fetch, ascending.
    missing: list[int]
    written: int = 0
    fd: int = -1
    finished: bool = False


# --- the blocking parts (run in worker threads) -----------------------------------------


def _pread_into(fd: int, buf: bytearray, length: int, offset: int) -> memoryview:
    """Read exactly ``length`` bytes at ``offset`` into ``buf``; shorter at EOF."""
    view = memoryview(buf)[:length]
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return view[:got]


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _open_staged(files_dir: Path, path: str) -> tuple[int, int]:
    """(fd, size before) of the staged file, created if missing. Never follows a symlink."""
    f = safe_open_for_write(files_dir, path)
    fd = os.dup(f.fileno())
    f.close()
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        os.close(fd)
        raise wrap_oserror(e, f"stat staged {path}") from e
    return fd, size


class _Planner:
    """Step 1: what is already staged, what can be copied locally, what is missing."""

    def __init__(
        self, manifest: Manifest, files_dir: Path, app_root: Path, installed: Manifest | None
    ) -> None:
        self.m = manifest
        self.files_dir = files_dir
        self.app_root = app_root
        self.by_digest: dict[bytes, str] = {}
        if installed is not None and installed.hash == manifest.hash:
            for f in installed.files:
                self.by_digest.setdefault(f.digest, f.path)
        self.buf = bytearray(manifest.chunk_size)
        self.result = DownloadResult(version=manifest.version)

    def _source(self, entry: FileEntry) -> int | None:
        path = self.by_digest.get(entry.digest, entry.path)
        try:
            f = open_for_read(self.app_root, path)
        except FilesystemError:
            return None  # an unsafe or unreadable local file is simply not a source
        if f is None:
            return None
        fd = os.dup(f.fileno())
        f.close()
        return fd

    def plan(self, index: int, entry: FileEntry) -> _File:
        cs = self.m.chunk_size
        n = entry.chunk_count(cs)
        fd, size = _open_staged(self.files_dir, entry.path)
        src: int | None = None
        missing: list[int] = []
        try:
            if size != entry.size:
                os.ftruncate(fd, entry.size)
            src = self._source(entry) if n else None
            for i in range(n):
                length = entry.chunk_length(cs, i)
                offset = i * cs
                want = entry.chunks[i]
                if size > offset:
                    data = _pread_into(fd, self.buf, length, offset)
                    if len(data) == length and digest(self.m.hash, data) == want:
                        self.result.chunks_resumed += 1
                        self.result.bytes_resumed += length
                        continue
                if src is not None:
                    data = _pread_into(src, self.buf, length, offset)
                    if len(data) == length and digest(self.m.hash, data) == want:
                        _pwrite_all(fd, data, offset)
                        self.result.chunks_copied += 1
                        self.result.bytes_copied += length
                        continue
                missing.append(i)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise wrap_oserror(e, f"stage {entry.path}") from e
            raise
        finally:
            if src is not None:
                os.close(src)
        if missing:
            os.close(fd)  # reopened when its first chunk arrives: 20,000 files, few fds
            return _File(index, entry, missing)
        _finish_sync(_File(index, entry, [], fd=fd), self.files_dir)  # closes fd
        return _File(index, entry, [], finished=True)


def _verify_write(algorithm: str, fd: int, payload: memoryview, offset: int, want: bytes) -> bool:
    """Hash the chunk; only if it matches its signed digest, write it at its offset."""
    if digest(algorithm, payload) != want:
        return False
    _pwrite_all(fd, payload, offset)
    return True


def _finish_sync(f: _File, files_dir: Path) -> None:
    """Check the size, fsync and close a file whose every chunk was verified.

    Raises :class:`IntegrityError` (the file is then truncated so no resume
    trusts it) or :class:`FilesystemError`.
    """
    try:
        try:
            if os.fstat(f.fd).st_size != f.entry.size:
                os.ftruncate(f.fd, 0)
                raise IntegrityError(
                    f"{f.entry.path}: staged size differs from the signed manifest"
                )
            os.fsync(f.fd)
        finally:
            os.close(f.fd)
            f.fd = -1
    except OSError as e:
        raise wrap_oserror(e, f"finish staged {files_dir}/{f.entry.path}") from e


# --- the download -----------------------------------------------------------------------


class _Download:
    def __init__(
        self,
        peer: Peer,
        signed: SignedManifest,
        manifest: Manifest,
        layout: StateLayout,
        app_root: Path,
        *,
        window: int,
        chunks_per_request: int,
        io_threads: int,
        max_rate: float,
        on_progress: ProgressCallback | None,
        request_timeout: float,
    ) -> None:
        self.peer = peer
        self.signed = signed
        self.m = manifest
        self.layout = layout
        self.app_root = app_root
        self.files_dir = layout.staged_files(manifest.version)
        self.per_request = max(1, min(chunks_per_request, window, 64))
        self.max_requests = max(1, window // self.per_request)
        self.io_limiter = trio.CapacityLimiter(io_threads)
        self.io_threads = io_threads
        self.max_rate = max_rate
        self.on_progress = on_progress
        self.request_timeout = request_timeout
        self.files: list[_File] = []
        self.result = DownloadResult(version=manifest.version)
        self.done_bytes = 0
        self.bad: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done_bytes, self.m.total_size)

    async def run(self) -> DownloadResult:
        started = time.monotonic()
        await trio.to_thread.run_sync(self._prepare)
        installed = await trio.to_thread.run_sync(self._installed_manifest)
        planner = _Planner(self.m, self.files_dir, self.app_root, installed)
        try:
            for index, entry in enumerate(self.m.files):
                f = await trio.to_thread.run_sync(planner.plan, index, entry)
                self.files.append(f)
                self.done_bytes += entry.size - sum(
                    entry.chunk_length(self.m.chunk_size, i) for i in f.missing
                )
            self._progress()
            self.result = attrs.evolve(planner.result, version=self.m.version)
            self.result.bytes_total = self.m.total_size
            self.result.chunks_total = self.m.total_chunks
            await self._fetch()
        finally:
            for f in self.files:
                if f.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(f.fd)
                    f.fd = -1
        self.result.elapsed = time.monotonic() - started
        return self.result

    def _prepare(self) -> None:
        """Keep the manifest beside the files (resume needs it) and check free space."""
        path = self.layout.staged_manifest(self.m.version)
        data = encode_signed_manifest(self.signed)
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = None
        except OSError as e:
            raise wrap_oserror(e, f"read {path}") from e
        if current != data:
            atomic_write_bytes(path, data)
        try:
            self.files_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise wrap_oserror(e, f"create {self.files_dir}") from e
        have = 0
        for entry in self.m.files:
            with contextlib.suppress(OSError, ValueError):
                st = os.lstat(self.files_dir / entry.path)
                have += min(st.st_blocks * 512, entry.size)
        check_free_space(
            self.files_dir,
            self.m.total_size - have + FREE_SPACE_MARGIN,
            f"download {self.m.version}",
        )

    def _installed_manifest(self) -> Manifest | None:
        try:
            signed = read_signed_manifest(self.layout.installed_manifest)
            return None if signed is None else Manifest.from_bytes(signed.signed)
        except (UpdaterError, ManifestError) as e:
            log.warning("installed manifest unusable for local copies: %s", e)
            return None
        except Exception as e:  # a bad path in an old manifest: just no local copies
            log.warning("installed manifest unusable for local copies: %s", e)
            return None

    # --- fetching ------------------------------------------------------------------

    async def _fetch(self) -> None:
        wanted = deque((f.index, i) for f in self.files for i in f.missing)
        if not wanted:
            return
        log.info(
            "fetching %d of %d chunks of %s %s",
            len(wanted),
            self.m.total_chunks,
            self.m.app,
            self.m.version,
        )
        send_io, recv_io = trio.open_memory_channel[tuple[_File, int, memoryview]](self.io_threads)
        started = trio.current_time()
        fetched = 0
        async with trio.open_nursery() as nursery:
            for _ in range(self.io_threads):
                nursery.start_soon(self._io_worker, recv_io.clone())
            recv_io.close()
            async with send_io:
                pending: deque[tuple[ChunkStream, Callable[..., object]]] = deque()
                try:
                    while wanted or pending:
                        while wanted and len(pending) < self.max_requests:
                            n = min(self.per_request, len(wanted))
                            batch = [wanted.popleft() for _ in range(n)]
                            self.result.chunks_fetched += len(batch)
                            pending.append(await self._request(batch))
                        stream, result = pending.popleft()
                        try:
                            async for c in stream:
                                await send_io.send((self.files[c.file], c.chunk, c.payload))
                                fetched += len(c.payload)
                                if self.max_rate:
                                    ahead = started + fetched / self.max_rate - trio.current_time()
                                    if ahead > 0:
                                        await trio.sleep(ahead)
                            await _await_result(result, self.request_timeout)
                        finally:
                            stream.close()
                        if self.errors:
                            break
                except (DownloadError, UpdaterError) as e:
                    # Let the workers write what already arrived (a resume keeps
                    # it), then raise outside the nursery, unwrapped.
                    self.errors.insert(0, e)
                finally:
                    for stream, _ in pending:
                        stream.close()
        self.result.bytes_fetched = fetched
        if self.errors:
            raise self.errors[0]
        if self.bad:
            path, chunk = self.bad[0]
            raise IntegrityError(
                f"{len(self.bad)} chunk(s) refused: {path} chunk {chunk} does not match "
                "its digest in the signed manifest"
            )

    async def _request(
        self, batch: list[tuple[int, int]]
    ) -> tuple[ChunkStream, Callable[..., object]]:
        params = GetChunks(app=self.m.app, version=self.m.version, chunks=batch)
        try:
            return await self.peer.request_chunks(params, buffer=self.per_request)
        except TransportError as e:
            raise DownloadError(f"connection lost while downloading: {e}") from e

    async def _io_worker(
        self, recv: trio.MemoryReceiveChannel[tuple[_File, int, memoryview]]
    ) -> None:
        async with recv:
            async for f, chunk, payload in recv:
                if f.finished or self.errors:
                    continue
                try:
                    if f.fd < 0:
                        f.fd, _ = await trio.to_thread.run_sync(
                            _open_staged, self.files_dir, f.entry.path, limiter=self.io_limiter
                        )
                    cs = self.m.chunk_size
                    ok = len(payload) == f.entry.chunk_length(
                        cs, chunk
                    ) and await trio.to_thread.run_sync(
                        _verify_write,
                        self.m.hash,
                        f.fd,
                        payload,
                        chunk * cs,
                        f.entry.chunks[chunk],
                        limiter=self.io_limiter,
                    )
                except (UpdaterError, OSError) as e:
                    self.errors.append(
                        e if isinstance(e, UpdaterError) else wrap_oserror(e, "write chunk")
                    )
                    continue
                if not ok:
                    log.warning("%s chunk %d: digest mismatch, refused", f.entry.path, chunk)
                    self.bad.append((f.entry.path, chunk))
                    continue
                f.written += 1
                self.done_bytes += len(payload)
                self._progress()
                await self._maybe_finish(f)

    async def _maybe_finish(self, f: _File) -> None:
        if f.finished or f.written < len(f.missing):
            return
        f.finished = True
        try:
            await trio.to_thread.run_sync(_finish_sync, f, self.files_dir, limiter=self.io_limiter)
        except UpdaterError as e:
            self.errors.append(e)
        except IntegrityError as e:
            self.errors.append(e)


async def _await_result(result: Callable[..., object], timeout: float) -> None:
    try:
        await result(timeout)  # type: ignore[misc]
    except RpcError as e:
        raise DownloadError(f"the releaser refused the chunks: {e.message}") from e
    except TransportError as e:
        raise DownloadError(f"connection lost while downloading: {e}") from e
    except trio.TooSlowError as e:
        raise DownloadError("the releaser stopped sending chunks") from e


async def download(
    peer: Peer,
    signed: SignedManifest,
    manifest: Manifest,
    layout: StateLayout,
    app_root: str | os.PathLike[str],
    *,
    window: int = 16,
    chunks_per_request: int = 4,
    io_threads: int = 2,
    max_rate: float = 0.0,
    on_progress: ProgressCallback | None = None,
    request_timeout: float = 60.0,
) -> DownloadResult:
    """Stage every file of ``manifest`` (already verified) under ``layout``.

    ``on_progress(done, total)`` is called in the trio thread as bytes are
    verified. On return every file is staged, verified whole and fsynced; the
    caller writes the STAGED marker. Raises :class:`DownloadError`,
    :class:`IntegrityError`, :class:`DiskFullError`, :class:`UnsafePathError`,
    :class:`FilesystemError` (see the module docstring).
    """
    job = _Download(
        peer,
        signed,
        manifest,
        layout,
        Path(app_root),
        window=window,
        chunks_per_request=chunks_per_request,
        io_threads=io_threads,
        max_rate=max_rate,
        on_progress=on_progress,
        request_timeout=request_timeout,
    )
    return await job.run()


__all__ = [
    "DownloadError",
    "DownloadResult",
    "download",
    "encode_signed_manifest",
    "read_signed_manifest",
]
