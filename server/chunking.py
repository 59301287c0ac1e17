"""Cutting a file into chunks at publish time, and hashing it in the same pass.

Two ways to cut (specs/PROTOCOL.md §7.3.3):

- ``fixed``: chunks of the manifest's ``chunk_size`` (1 MiB by default), as
  protocol 1.0 devices expect;
- ``cdc`` (the default): FastCDC content-defined chunks, min 16 KiB, max
  256 KiB, mean about 64 KiB. A cut depends only on the bytes just before it,
  so an insertion moves the cuts near it and no others: three 4 KiB
  insertions into a 256 MiB file used to re-send 202 MB of fixed chunks
  (issue 14). The manifest records each chunk's length (``FileEntry.sizes``)
  and its ``chunk_size`` is the maximum.

Only the publisher runs the chunker; a device reads the cuts from the signed
manifest. The cuts are a pure function of the file's bytes and the
parameters below, so re-publishing identical files gives identical chunk
digests, and a device holding them downloads nothing but the manifest.

A release signed elsewhere (``publish --signed``) is re-hashed at the cuts
its manifest names (:class:`GivenCut`), never re-chunked.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import attrs
from fleetpush.protocol import FileEntry, Manifest, hashing
from fleetpush.protocol.compression import compress_chunk
from fleetpush.protocol.limits import DEFAULT_CHUNK_SIZE
from pyfastcdc import FastCDC

from .errors import PublishError

#: FastCDC parameters (pyfastcdc's ``avg_size`` is the mean *past* the
#: minimum: chunks average about 16 + 48 = 64 KiB). Changing any of them moves
#: every cut, so every device would download everything once: they are part
#: of what "identical re-publish" means.
CDC_MIN: Final = 16 * 1024
CDC_AVG: Final = 48 * 1024
CDC_MAX: Final = 256 * 1024
#: The smallest maximum publishing accepts: twice the mean, so FastCDC's
#: normalised cuts are not squeezed against the limit.
CDC_MIN_MAX: Final = 128 * 1024

#: Bytes read at a time around the chunker.
_BLOCK: Final = 8 * 1024 * 1024

CHUNKINGS: Final = ("cdc", "fixed")


@attrs.frozen
class FixedCut:
    """Chunks of ``size`` bytes (the last one shorter), protocol 1.0's."""

    size: int


@attrs.frozen
class CdcCut:
    """FastCDC content-defined chunks, at most ``CDC_MAX`` bytes."""

    max_size: int = CDC_MAX


@attrs.frozen
class GivenCut:
    """The cuts a signed manifest names for one file (its ``sizes``)."""

    sizes: tuple[int, ...]


Cut = FixedCut | CdcCut | GivenCut


@attrs.frozen
class Indexed:
    """What one pass over a file found."""

    entry: FileEntry
    #: (chunk index, zstd frame) for the chunks worth sending compressed
    #: (protocol/compression.py, at least 10% smaller); empty unless asked.
    compressed: list[tuple[int, bytes]]


def index_file(
    path: Path,
    rel: str,
    cut: Cut,
    algorithm: str,
    *,
    copy_to: Path | None = None,
    compress: bool = False,
) -> Indexed:
    """Read ``path`` once: cut it, hash the chunks and the whole, copy it if asked.

    ``rel`` is its path in the manifest. With ``copy_to`` the bytes are also
    written there (and fsynced). With ``compress`` each chunk is also tried
    with zstd. Raises :class:`PublishError`.
    """
    whole = hashing.new_hasher(algorithm)
    digests: list[bytes] = []
    sizes: list[int] = []
    packed: list[tuple[int, bytes]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with io.FileIO(fd, "rb", closefd=True) as src:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PublishError(f"{path}: not a regular file")
            out = None
            if copy_to is not None:
                copy_to.parent.mkdir(parents=True, exist_ok=True)
                out = open(copy_to, "xb")  # noqa: SIM115 - closed in finally
            try:
                for piece in _pieces(src, cut, path):
                    whole.update(piece)
                    digests.append(hashing.digest(algorithm, piece))
                    if compress and (small := compress_chunk(piece)) is not None:
                        packed.append((len(sizes), small))
                    sizes.append(len(piece))
                    if out is not None:
                        out.write(piece)
                if out is not None:
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                if out is not None:
                    out.close()
    except OSError as e:
        raise PublishError(f"cannot read {path}: {e}") from e
    entry = FileEntry(
        path=rel,
        size=sum(sizes),
        mode=stat.S_IMODE(st.st_mode) & 0o777,
        digest=whole.digest(),
        chunks=digests,
        # A fixed cut leaves sizes out: the manifest stays readable by 1.0 devices.
        sizes=None if isinstance(cut, FixedCut) else sizes,
    )
    return Indexed(entry=entry, compressed=packed)


def _pieces(src: io.FileIO, cut: Cut, path: Path) -> Iterator[memoryview]:
    """The file's chunks in order; each view is valid until the next is asked for."""
    if isinstance(cut, CdcCut):
        yield from _cdc_pieces(src, cut.max_size)
        return
    lengths: Iterator[int] = iter(cut.sizes) if isinstance(cut, GivenCut) else _forever(cut.size)
    buf = bytearray(max(cut.sizes, default=0) if isinstance(cut, GivenCut) else cut.size)
    view = memoryview(buf)
    for n in lengths:
        got = _read_full(src, view[:n])
        if got:
            yield view[:got]
        if got < n:
            if isinstance(cut, GivenCut):
                raise PublishError(f"{path}: shorter than its signed manifest says")
            return
    if isinstance(cut, GivenCut) and src.read(1):
        raise PublishError(f"{path}: longer than its signed manifest says")


def _cdc_pieces(src: io.FileIO, max_size: int) -> Iterator[memoryview]:
    """FastCDC over the file, read in large blocks.

    A FastCDC cut depends only on the bytes since the previous cut, so the
    chunk that reaches the end of a block is not final: its bytes are carried
    into the next block and cut again from its start, which gives exactly the
    cuts of one pass over the whole file. (pyfastcdc's own stream reader
    reads at most 2 x max_size at a time: 3x slower here, in syscalls and moves.)
    """
    chunker = FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=max_size)
    buf = bytearray(_BLOCK + max_size)
    view = memoryview(buf)
    held = 0  # bytes at the start of buf carried over from the previous block
    while True:
        got = _read_full(src, view[held : held + _BLOCK])
        end = held + got
        last = got < _BLOCK  # the file ended inside this block
        done = 0
        for chunk in chunker.cut_buf(view[:end]):
            if not last and chunk.offset + chunk.length == end:
                break  # provisional: cut it again with the next block's bytes
            yield chunk.data
            done = chunk.offset + chunk.length
        if last:
            return
        held = end - done
        buf[:held] = view[done:end]


def _forever(n: int) -> Iterator[int]:
    while True:
        yield n


def _read_full(src: io.FileIO, into: memoryview) -> int:
    """Fill ``into`` unless the file ends first (os reads may come back short)."""
    got = 0
    while got < len(into):
        n = src.readinto(into[got:])
        if not n:
            break
        got += n
    return got


def cutter(chunking: str, chunk_size: int | None) -> tuple[Callable[[str], Cut], int]:
    """How publishing cuts each file, and the manifest's chunk_size (§7.3.3).

    Raises :class:`PublishError` for an unknown ``chunking``.
    """
    if chunking == "cdc":
        size = chunk_size or CDC_MAX  # the largest chunk FastCDC may cut
        if size < CDC_MIN_MAX:
            raise PublishError(
                f"chunk size {size} is too small for content-defined chunks: "
                f"the largest chunk must be at least {CDC_MIN_MAX // 1024} KiB"
            )
        return (lambda _rel: CdcCut(size)), size
    if chunking == "fixed":
        size = chunk_size or DEFAULT_CHUNK_SIZE
        return (lambda _rel: FixedCut(size)), size
    raise PublishError(f"unknown chunking {chunking!r}: use one of {', '.join(CHUNKINGS)}")


def signed_cut(manifest: Manifest) -> Callable[[str], Cut]:
    """Re-hash a signed manifest's files at the cuts it names, never re-chunking them."""
    by_path = {f.path: f for f in manifest.files}

    def cut(rel: str) -> Cut:
        entry = by_path.get(rel)
        if entry is None or entry.sizes is None:
            return FixedCut(manifest.chunk_size)  # an extra file is reported by _match
        return GivenCut(tuple(entry.sizes))

    return cut
