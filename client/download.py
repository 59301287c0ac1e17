"""Verified, resumable, windowed download of a release into the staging area.

The downloader fills ``<state>/updates/<version>/files/<path>`` (layout.py) for
one *verified* manifest (fleetpush.protocol.trust has already passed it):

1. **Plan** (download_plan.py, in a worker thread): unchanged files are
   skipped, chunks already staged are re-verified (resume), chunks the device
   holds elsewhere (the seed: installed and other staged versions, by digest)
   are copied after a re-hash; the rest is missing.
2. **Fetch**. Missing chunks are asked for in ``get_chunks`` requests of up to
   ``MAX_CHUNKS_PER_REQUEST`` (file, chunk) pairs, with at most ``window``
   maximum-size chunks' worth of bytes outstanding, so small content-defined
   chunks do not cost a round trip each and the releaser always has the next
   request queued (specs/PROTOCOL.md §7.3). Each DATA payload arrives in a
   pooled buffer (protocol/buffers.py) and is hashed once and written once
   with ``pwrite`` from that same buffer, in worker threads (hashlib, blake3
   and ``os.pwrite`` release the GIL), a batch of chunks per thread hop,
   while the trio thread keeps receiving.
3. **Finish**. A file whose every chunk has been verified is checked for its
   signed size, fsynced and closed. Its whole-file digest is *not* hashed
   again: each chunk covers the byte range its manifest gives it
   (specs/PROTOCOL.md §7.3) and every range has matched its signed digest, so
   the bytes are exactly the signed ones; the releaser refuses to publish a
   manifest whose file digest is not the hash of those same bytes (§7.2).

Memory stays flat: the bytes outstanding are bounded, and every buffer is
written and dropped (returned to the pool) as it arrives. Nothing is ever
written outside the staging tree: paths come from the verified manifest and
are opened with ``fsutil.safe_open_for_write`` (no ``..``, no symlinks).

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
from fleetpush.protocol import compression
from fleetpush.protocol.errors import (
    CloseCode,
    FrameError,
    IntegrityError,
    ManifestError,
    RpcError,
)
from fleetpush.protocol.handshake import VARIABLE_CHUNKS, ZSTD, hash_capabilities
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.limits import MAX_CHUNKS_PER_REQUEST
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import GetChunks, SignedManifest

from fleetpush.net.peer import ChunkStream, Peer, TransportError

from .download_plan import (
    DownloadResult,
    PlannedFile,
    Planner,
    build_seed,
    finish_file,
    open_staged,
    pwrite_all,
    seed_sources,
)
from .errors import UpdaterError, wrap_oserror
from .fetch_window import window_sizes
from .fsutil import (
    atomic_write_bytes,
    check_free_space,
)
from .layout import StateLayout
from .staging import encode_signed_manifest, read_signed_manifest, unchanged_paths

log = logging.getLogger("fleetpush.client.download")

#: Head room kept free beyond the bytes a download still needs.
FREE_SPACE_MARGIN: Final = 4 * 1024 * 1024

#: get_chunks requests outstanding (the window's bytes are split among them),
#: and at most this many however small the chunks.
REQUESTS_IN_FLIGHT: Final = 4
MAX_REQUESTS_IN_FLIGHT: Final = 16
#: DATA frames buffered per chunk stream between the reader and the writer.
STREAM_BUFFER: Final = 2
#: A batch for the writer threads: chunks that arrived together, handed over
#: in one channel send and one thread hop (content-defined chunks are small:
#: a hop per chunk cost more than hashing and writing it).
IO_BATCH: Final = 32
IO_BATCH_BYTES: Final = 1024 * 1024
#: A batch this small is hashed and written in the trio thread: measured on
#: 2 busy cores, waking a worker thread cost 0.1-0.4 ms, hashing and writing
#: 64 KiB well under that (scripts/download_cpu.py, content-defined chunks).
INLINE_BYTES: Final = 128 * 1024

ProgressCallback = Callable[[int, int], None]
#: A chunk as it arrived: (file, chunk index, payload, compressed).
_Arrived = tuple[PlannedFile, int, memoryview, bool]


class DownloadError(UpdaterError):
    """The download could not complete (link lost, releaser refused); resumable."""


def capabilities() -> list[str]:
    """What the device announces in its hello: hashes, content-defined chunks, zstd."""
    caps = [*hash_capabilities(), VARIABLE_CHUNKS]
    if compression.available():
        caps.append(ZSTD)
    return caps


#: One chunk for a writer thread: (fd, payload, offset, length, digest, compressed).
_Job = tuple[int, memoryview, int, int, bytes, bool]


def _verify_write_many(algorithm: str, jobs: list[_Job]) -> list[bool]:
    """Hash each chunk; only if it matches its signed digest, write it at its offset.

    One thread hop for a batch: small content-defined chunks hash and write
    in tens of microseconds, less than a hop costs. A DATA_ZSTD payload is
    expanded first, to at most the chunk's signed length, and the digest is
    checked over the expanded bytes (§2.3.1). Raises :class:`FrameError`
    (a bomb, a wrong length: the releaser broke the protocol).
    """
    out = []
    for fd, payload, offset, length, want, compressed in jobs:
        data = compression.decompress_chunk(payload, length) if compressed else payload
        ok = digest(algorithm, data) == want
        if ok:
            pwrite_all(fd, data, offset)
        out.append(ok)
    return out


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
        # Bytes outstanding: ``window`` chunks of the manifest's (maximum) size,
        # at least 1 MiB each (fetch_window.py), asked for in
        # ``REQUESTS_IN_FLIGHT`` requests of up to MAX_CHUNKS_PER_REQUEST
        # chunks each. chunks_per_request is the least a request asks for
        # when that many are wanted (fixed 1 MiB chunks: 4).
        self.window_bytes, self.request_bytes = window_sizes(
            window, manifest.chunk_size, chunks_per_request, REQUESTS_IN_FLIGHT
        )
        self.io_limiter = trio.CapacityLimiter(io_threads)
        self.io_threads = io_threads
        # Batches waiting for a worker: at most io_threads x IO_BATCH_BYTES (or
        # one chunk each, when chunks are larger).
        self.io_queue = io_threads
        self.max_rate = max_rate
        self.on_progress = on_progress
        self.request_timeout = request_timeout
        self.files: list[PlannedFile] = []
        self.result = DownloadResult(version=manifest.version)
        self.done_bytes = 0
        self.bad: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        #: the releaser broke the protocol: raised before what followed from it.
        self.fatal: DownloadError | None = None
        self._started = 0.0  # when fetching started (trio clock), for max_rate
        self._fetched = 0  # payload bytes received

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.done_bytes, self.m.total_size)

    async def run(self) -> DownloadResult:
        started = time.monotonic()
        installed = await trio.to_thread.run_sync(self._installed_manifest)
        await trio.to_thread.run_sync(self._prepare, installed)
        seed = await trio.to_thread.run_sync(
            lambda: build_seed(
                self.m.hash,
                seed_sources(self.layout, self.app_root, self.m.version, installed),
            )
        )
        planner = Planner(self.m, self.files_dir, installed, seed, self.app_root)
        try:
            for index, entry in enumerate(self.m.files):
                f = await trio.to_thread.run_sync(planner.plan, index, entry)
                self.files.append(f)
                self.done_bytes += entry.size - f.missing_bytes()
            self._progress()
            self.result = attrs.evolve(planner.result, version=self.m.version)
            self.result.bytes_total = self.m.total_size
            self.result.chunks_total = self.m.total_chunks
            await self._fetch()
        finally:
            planner.close()
            for f in self.files:
                if f.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(f.fd)
                    f.fd = -1
        self.result.elapsed = time.monotonic() - started
        return self.result

    def _prepare(self, installed: Manifest | None) -> None:
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
        unchanged = unchanged_paths(self.m, installed)
        have = 0
        for entry in self.m.files:
            if entry.path in unchanged:
                have += entry.size  # never staged
                continue
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

    def _batches(self) -> deque[tuple[list[tuple[int, int]], int]]:
        """The missing (file, chunk) pairs in requests: (pairs, bytes)."""
        out: deque[tuple[list[tuple[int, int]], int]] = deque()
        batch: list[tuple[int, int]] = []
        size = 0
        for f in self.files:
            for i in f.missing:
                length = f.spans[i][1]
                if batch and (
                    len(batch) >= MAX_CHUNKS_PER_REQUEST or size + length > self.request_bytes
                ):
                    out.append((batch, size))
                    batch, size = [], 0
                batch.append((f.index, i))
                size += length
        if batch:
            out.append((batch, size))
        return out

    async def _fetch(self) -> None:
        wanted = self._batches()
        if not wanted:
            return
        log.info(
            "fetching %d of %d chunks of %s %s in %d requests",
            sum(len(b) for b, _ in wanted),
            self.m.total_chunks,
            self.m.app,
            self.m.version,
            len(wanted),
        )
        send_io, recv_io = trio.open_memory_channel[list[_Arrived]](self.io_queue)
        self._started = trio.current_time()
        self._fetched = 0
        async with trio.open_nursery() as nursery:
            for _ in range(self.io_threads):
                nursery.start_soon(self._io_worker, recv_io.clone())
            recv_io.close()
            async with send_io:
                pending: deque[tuple[ChunkStream, Callable[..., object], int]] = deque()
                outstanding = 0
                try:
                    while wanted or pending:
                        while (
                            wanted
                            and (not pending or outstanding + wanted[0][1] <= self.window_bytes)
                            and len(pending) < MAX_REQUESTS_IN_FLIGHT
                        ):
                            batch, size = wanted.popleft()
                            self.result.chunks_fetched += len(batch)
                            stream, result = await self._request(batch)
                            pending.append((stream, result, size))
                            outstanding += size
                        stream, result, size = pending.popleft()
                        try:
                            await self._pump(stream, send_io)
                            await _await_result(result, self.request_timeout)
                        finally:
                            stream.close()
                        outstanding -= size
                        if self.errors:
                            break
                except (DownloadError, UpdaterError) as e:
                    # Let the workers write what already arrived (a resume keeps
                    # it), then raise outside the nursery, unwrapped.
                    self.errors.insert(0, e)
                finally:
                    for stream, _, _ in pending:
                        stream.close()
        self.result.bytes_fetched = self._fetched
        if self.fatal is not None:
            raise self.fatal
        if self.errors:
            raise self.errors[0]
        if self.bad:
            path, chunk = self.bad[0]
            raise IntegrityError(
                f"{len(self.bad)} chunk(s) refused: {path} chunk {chunk} does not match "
                "its digest in the signed manifest"
            )

    async def _pump(
        self, stream: ChunkStream, send_io: trio.MemorySendChannel[list[_Arrived]]
    ) -> None:
        """Hand the chunks of ``stream`` to the writers, in batches of what arrived together."""
        batch: list[_Arrived] = []
        size = 0
        while True:
            try:
                c = stream.receive_nowait()
            except trio.WouldBlock:
                if batch:  # nothing more right now: let the writers start
                    await send_io.send(batch)
                    batch, size = [], 0
                    continue
                try:
                    c = await stream.receive()
                except trio.EndOfChannel:
                    break
            except trio.EndOfChannel:
                break
            batch.append((self.files[c.file], c.chunk, c.payload, c.compressed))
            size += len(c.payload)
            self._fetched += len(c.payload)
            del c  # its buffer returns to the pool once written
            if len(batch) >= IO_BATCH or size >= IO_BATCH_BYTES:
                await send_io.send(batch)
                batch, size = [], 0
            if self.max_rate:
                ahead = self._started + self._fetched / self.max_rate - trio.current_time()
                if ahead > 0:
                    await trio.sleep(ahead)
        if batch:
            await send_io.send(batch)

    async def _request(
        self, batch: list[tuple[int, int]]
    ) -> tuple[ChunkStream, Callable[..., object]]:
        params = GetChunks(app=self.m.app, version=self.m.version, chunks=batch)
        try:
            # A few frames buffered per stream: the rest waits in the socket.
            return await self.peer.request_chunks(params, buffer=STREAM_BUFFER)
        except TransportError as e:
            raise DownloadError(f"connection lost while downloading: {e}") from e

    async def _io_worker(self, recv: trio.MemoryReceiveChannel[list[_Arrived]]) -> None:
        async with recv:
            async for batch in recv:
                await self._write_batch(batch)
                del batch  # drop the payloads: their buffers go back to the pool

    async def _write_batch(self, batch: list[_Arrived]) -> None:
        jobs: list[_Job] = []
        taken: list[tuple[PlannedFile, int, int]] = []
        try:
            for f, chunk, payload, compressed in batch:
                if f.finished or self.errors:
                    continue
                offset, length = f.spans[chunk]
                if not compressed and len(payload) != length:
                    log.warning("%s chunk %d: wrong length, refused", f.entry.path, chunk)
                    self.bad.append((f.entry.path, chunk))
                    continue
                if f.fd < 0:
                    f.fd, _ = await trio.to_thread.run_sync(
                        open_staged, self.files_dir, f.entry.path, limiter=self.io_limiter
                    )
                jobs.append((f.fd, payload, offset, length, f.entry.chunks[chunk], compressed))
                taken.append((f, chunk, length))
            if sum(job[3] for job in jobs) <= INLINE_BYTES:
                # Less work than a thread hop costs: done here, between receives.
                oks = _verify_write_many(self.m.hash, jobs)
            else:
                oks = await trio.to_thread.run_sync(
                    _verify_write_many, self.m.hash, jobs, limiter=self.io_limiter
                )
        except FrameError as e:
            # A DATA_ZSTD frame that does not expand to its chunk: a protocol
            # error, which closes the link (§2.3.1, specs/THREATS.md).
            bad = DownloadError(f"the releaser sent a bad compressed chunk: {e}")
            self.fatal = self.fatal or bad
            self.errors.append(bad)
            await self.peer.close(CloseCode.PROTOCOL_ERROR, str(e))
            return
        except (UpdaterError, OSError) as e:
            self.errors.append(e if isinstance(e, UpdaterError) else wrap_oserror(e, "write chunk"))
            return
        finally:
            jobs.clear()
        for (f, chunk, length), ok in zip(taken, oks, strict=True):
            if not ok:
                log.warning("%s chunk %d: digest mismatch, refused", f.entry.path, chunk)
                self.bad.append((f.entry.path, chunk))
                continue
            f.written += 1
            self.done_bytes += length
        self._progress()
        for f, _, _ in taken:
            await self._maybe_finish(f)

    async def _maybe_finish(self, f: PlannedFile) -> None:
        if f.finished or f.written < len(f.missing):
            return
        f.finished = True
        try:
            await trio.to_thread.run_sync(finish_file, f, self.files_dir, limiter=self.io_limiter)
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
