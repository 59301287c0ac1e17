"""Step 1 of a download: what is staged already, what the device holds, what is missing.

Before a byte is asked of the releaser, every chunk of the new manifest is
looked for on the device (issue 14, items 2 and 4):

- a file the installed manifest lists *unchanged* (same path, digest, size
  and mode; staging.unchanged_paths) is not staged at all: install leaves it
  where it is (specs/PROTOCOL.md §7.2);
- a chunk already in the staged file at its offset is re-verified and kept
  (a resume after a dropped link or ``kill -9``);
- a chunk whose digest is in the *seed* is read from there, re-hashed and
  written into the staged file. The seed maps a chunk digest to a (file,
  offset, length) of what the device holds: the installed release and any
  other staged or partially staged version, from their manifests. So a
  chunk that moved to another path or another offset (content-defined
  chunks after an insertion) is copied, not downloaded; seed bytes that no
  longer match (a file altered on disk, a hole of a partial download) are
  simply not used, and the chunk is fetched;
- on a device with no installed manifest (its app provisioned some other
  way), a chunk may also be at the same path and offset under the app root:
  that is probed too, re-hashed like the rest. With an installed manifest
  this probe is not made: the seed already names every chunk the installed
  files hold, and probing would read and hash a whole changed file for
  nothing;
- everything else is missing, and fetched (download.py).

The device never runs a chunker: it trusts only digests the signed
manifests name, and it re-hashes every byte it reuses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs
from fleetpush.protocol.errors import IntegrityError
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.manifest import FileEntry, Manifest

from .errors import FilesystemError, UpdaterError, wrap_oserror
from .fsutil import open_for_read, safe_open_for_write
from .layout import StateLayout
from .staging import decode_signed_manifest, unchanged_paths

log = logging.getLogger("fleetpush.client.download")


@attrs.define
class DownloadResult:
    """What one download did; ``chunks_fetched`` counts chunks asked of the releaser."""

    version: str
    bytes_total: int = 0
    #: chunk payload bytes received, as sent (DATA_ZSTD ones compressed).
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    bytes_copied: int = 0
    chunks_total: int = 0
    chunks_fetched: int = 0
    chunks_resumed: int = 0
    chunks_copied: int = 0
    #: files the installed release holds unchanged: neither fetched nor staged.
    files_unchanged: int = 0
    bytes_unchanged: int = 0
    elapsed: float = 0.0


def spans(entry: FileEntry, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of ``entry``, fixed or variable (§7.3.3)."""
    return [entry.chunk_span(chunk_size, i) for i in range(len(entry.chunks))]


@attrs.frozen
class SeedSpan:
    """Where the device holds bytes whose digest a manifest names."""

    root: Path
    path: str
    offset: int
    length: int


Seed = dict[bytes, SeedSpan]


def build_seed(algorithm: str, sources: list[tuple[Path, Manifest]]) -> Seed:
    """digest -> where, from manifests of what the device holds (first source wins).

    Only manifests hashed with ``algorithm`` count: a digest is compared
    with digests of the same function only.
    """
    seed: Seed = {}
    for root, m in sources:
        if m.hash != algorithm:
            continue
        for f in m.files:
            for want, (offset, length) in zip(f.chunks, spans(f, m.chunk_size), strict=True):
                seed.setdefault(want, SeedSpan(root, f.path, offset, length))
    return seed


def seed_sources(
    layout: StateLayout, app_root: Path, version: str, installed: Manifest | None
) -> list[tuple[Path, Manifest]]:
    """The installed release, then every other (partially) staged version."""
    sources: list[tuple[Path, Manifest]] = []
    if installed is not None:
        sources.append((app_root, installed))
    try:
        names = sorted(os.listdir(layout.updates_dir))
    except OSError:
        names = []
    for name in names:
        if name == version:
            continue  # this version's own chunks are resumed in place
        path = layout.staged_manifest(name)
        try:
            _signed, m = decode_signed_manifest(path.read_bytes(), str(path))
        except (OSError, UpdaterError) as e:
            log.debug("no seed from %s: %s", path, e)
            continue
        sources.append((layout.staged_files(name), m))
    return sources


@attrs.define(eq=False)
class PlannedFile:
    index: int
    entry: FileEntry
    #: (offset, length) of every chunk.
    spans: list[tuple[int, int]]
    #: chunk indices still to fetch, ascending.
    missing: list[int]
    written: int = 0
    fd: int = -1
    finished: bool = False
    #: in the installed release unchanged: nothing staged.
    unchanged: bool = False

    def missing_bytes(self) -> int:
        return sum(self.spans[i][1] for i in self.missing)


def pread_into(fd: int, buf: bytearray, length: int, offset: int) -> memoryview:
    """Read exactly ``length`` bytes at ``offset`` into ``buf``; shorter at EOF."""
    view = memoryview(buf)[:length]
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return view[:got]


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def open_staged(files_dir: Path, path: str) -> tuple[int, int]:
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


class Planner:
    """Plans one file at a time (in a worker thread); see the module docstring."""

    def __init__(
        self,
        manifest: Manifest,
        files_dir: Path,
        installed: Manifest | None,
        seed: Seed,
        app_root: Path,
    ) -> None:
        self.m = manifest
        # No installed manifest: probe the app root at the same path (docstring).
        self.probe_root = app_root if installed is None else None
        self.files_dir = files_dir
        self.unchanged = unchanged_paths(manifest, installed)
        self.seed = seed
        self.buf = bytearray(manifest.chunk_size)
        self.result = DownloadResult(version=manifest.version)
        self._sources: dict[tuple[Path, str], int | None] = {}

    def close(self) -> None:
        """Close the seed files opened so far."""
        for fd in self._sources.values():
            if fd is not None:
                os.close(fd)
        self._sources.clear()

    def _source(self, span: SeedSpan) -> int | None:
        key = (span.root, span.path)
        if key not in self._sources:
            try:
                f = open_for_read(span.root, span.path)
            except FilesystemError:
                f = None  # an unsafe or unreadable local file is simply not a source
            if f is None:
                self._sources[key] = None
            else:
                self._sources[key] = os.dup(f.fileno())
                f.close()
        return self._sources[key]

    def _from_seed(self, fd: int, path: str, want: bytes, offset: int, length: int) -> bool:
        span = self.seed.get(want)
        if span is None or span.length != length:
            if self.probe_root is None:
                return False
            span = SeedSpan(self.probe_root, path, offset, length)
        src = self._source(span)
        if src is None:
            return False
        try:
            data = pread_into(src, self.buf, length, span.offset)
        except OSError:
            return False  # a source that cannot be read is not a source
        if len(data) != length or digest(self.m.hash, data) != want:
            return False  # altered since its manifest was written: fetch instead
        pwrite_all(fd, data, offset)
        return True

    def plan(self, index: int, entry: FileEntry) -> PlannedFile:
        """Resume, copy from the seed, and list what is missing; finish a complete file.

        Raises :class:`FilesystemError` (and subclasses) or
        :class:`~fleetpush.protocol.errors.IntegrityError` (finish_file).
        """
        chunk_spans = spans(entry, self.m.chunk_size)
        if entry.path in self.unchanged:
            self.result.files_unchanged += 1
            self.result.bytes_unchanged += entry.size
            return PlannedFile(index, entry, chunk_spans, [], finished=True, unchanged=True)
        fd, size = open_staged(self.files_dir, entry.path)
        missing: list[int] = []
        r = self.result
        try:
            if size != entry.size:
                os.ftruncate(fd, entry.size)
            for i, (offset, length) in enumerate(chunk_spans):
                want = entry.chunks[i]
                if size > offset:
                    data = pread_into(fd, self.buf, length, offset)
                    if len(data) == length and digest(self.m.hash, data) == want:
                        r.chunks_resumed += 1
                        r.bytes_resumed += length
                        continue
                if self._from_seed(fd, entry.path, want, offset, length):
                    r.chunks_copied += 1
                    r.bytes_copied += length
                    continue
                missing.append(i)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise wrap_oserror(e, f"stage {entry.path}") from e
            raise
        if missing:
            os.close(fd)  # reopened when its first chunk arrives: 20,000 files, few fds
            return PlannedFile(index, entry, chunk_spans, missing)
        planned = PlannedFile(index, entry, chunk_spans, [], fd=fd)
        finish_file(planned, self.files_dir)  # closes fd
        planned.finished = True
        return planned


def finish_file(f: PlannedFile, files_dir: Path) -> None:
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
