"""A release's zstd-compressed chunks, kept next to its files (PROTOCOL.md §2.3.1).

``fleetpush release publish --compress`` tries zstd on every chunk and keeps
the frames that save at least 10% (protocol/compression.py) in one pack file,
``<data_dir>/releases/<token>.zst`` beside the release's directory. The
releaser then answers a device that announced ``"zstd"`` with DATA_ZSTD for
those chunks, and with DATA for the others and for every other device.
Compression is transport: the pack is not signed and not in the manifest; a
missing or unreadable pack only means chunks go out uncompressed.

Layout: the zstd frames back to back, then an index of 20-byte entries
(file u32, chunk u32, offset u64, size u32, big-endian, sorted), then the
entry count (u32) and the magic ``FPZ1``.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from fleetpush.protocol import IntegrityError, hashing
from fleetpush.protocol.compression import decompress_chunk
from fleetpush.protocol.errors import FrameError

MAGIC: Final = b"FPZ1"
_ENTRY: Final = struct.Struct(">IIQI")
_TAIL: Final = struct.Struct(">I4s")
#: Pack indexes kept in memory (a release's never changes once published).
_INDEXES_KEPT: Final = 64

PackIndex = dict[tuple[int, int], tuple[int, int]]


def pack_path(release_dir: Path) -> Path:
    """Where the pack of the release stored in ``release_dir`` lives."""
    return release_dir.with_name(release_dir.name + ".zst")


def write_pack(path: Path, frames: Iterable[tuple[int, int, bytes]]) -> int:
    """Write (file, chunk, zstd frame) entries to a new pack at ``path``; fsynced.

    Returns the number of entries. Raises OSError.
    """
    index: list[bytes] = []
    offset = 0
    with open(path, "xb") as out:
        for file, chunk, frame in sorted(frames, key=lambda e: (e[0], e[1])):
            out.write(frame)
            index.append(_ENTRY.pack(file, chunk, offset, len(frame)))
            offset += len(frame)
        out.write(b"".join(index))
        out.write(_TAIL.pack(len(index), MAGIC))
        out.flush()
        os.fsync(out.fileno())
    return len(index)


@functools.lru_cache(maxsize=_INDEXES_KEPT)
def load_index(path: Path) -> PackIndex:
    """The pack's (file, chunk) -> (offset, size); empty when there is no usable pack.

    A pack that does not parse is ignored (chunks then go out as DATA): it is
    an optimisation, and every byte a device receives is checked anyway.
    """
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)

            def read_at(offset: int, size: int) -> bytes:
                f.seek(offset)
                return f.read(size)

            return index_from(read_at, end)
    except OSError:
        return {}


def index_from(read_at: Callable[[int, int], bytes], end: int) -> PackIndex:
    """The index of a pack of ``end`` bytes read through ``read_at(offset, size)``.

    Also for packs in an object store (artifacts.py). Raises what ``read_at`` raises.
    """
    if end < _TAIL.size:
        return {}
    count, magic = _TAIL.unpack(read_at(end - _TAIL.size, _TAIL.size))
    start = end - _TAIL.size - count * _ENTRY.size
    if magic != MAGIC or start < 0:
        return {}
    raw = read_at(start, count * _ENTRY.size)
    index: PackIndex = {}
    for file, chunk, offset, size in _ENTRY.iter_unpack(raw):
        if offset + size <= start:
            index[(file, chunk)] = (offset, size)
    return index


def read_verified_frame(
    path: Path, where: tuple[int, int], length: int, algorithm: str, expected: bytes
) -> bytes:
    """The zstd frame at ``where`` (offset, size), once shown to expand to the chunk.

    Runs in a worker thread.
    Expanded and hashed like a plain chunk is read and hashed
    (chunks.read_verified_chunk), so a damaged pack is caught here, not by
    the device. Raises :class:`IntegrityError`, OSError.
    """
    offset, size = where
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        frame = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    return check_frame(frame, f"{path}: frame at offset {offset}", length, algorithm, expected)


def check_frame(frame: bytes, what: str, length: int, algorithm: str, expected: bytes) -> bytes:
    """``frame`` if it expands to ``length`` bytes with digest ``expected``.

    Raises :class:`IntegrityError` naming ``what``.
    """
    try:
        plain = decompress_chunk(frame, length)
    except FrameError as e:
        raise IntegrityError(f"{what}: {e}") from e
    if hashing.digest(algorithm, plain) != expected:
        raise IntegrityError(f"{what} does not match its digest")
    return frame
