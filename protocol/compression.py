"""Per-chunk zstd for DATA_ZSTD frames (specs/PROTOCOL.md §2.3.1), sans-IO.

The releaser compresses a chunk at publish time and keeps the result only
when it saves at least 10% (:func:`compress_chunk`); it sends DATA_ZSTD only
to a device that announced the ``"zstd"`` capability. The device expands the
payload with :func:`decompress_chunk`, which never produces more than the
chunk's length from the signed manifest: a decompression bomb or a frame of
the wrong length is a protocol error that closes the link
(specs/THREATS.md, "hostile DATA_ZSTD"). The digest is checked afterwards,
over the expanded bytes, exactly as for DATA.

``zstandard`` is optional (``pip install fleetpush[fast]``), like blake3: a
peer without it neither announces ``"zstd"`` nor compresses.
"""

from __future__ import annotations

from typing import Any, Final

from .errors import FrameError
from .limits import MAX_CHUNK_SIZE

_zstd: Any
try:  # optional dependency
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the install
    _zstd = None

#: §2.3.1: a chunk is sent compressed only when that saves at least this share.
MIN_SAVING: Final = 0.10
#: The level publishing uses: fast to compress, and decompression speed hardly
#: depends on it.
LEVEL: Final = 3
#: The largest zstd window a device accepts: a chunk is never longer than
#: MAX_CHUNK_SIZE, so no honest frame needs more (a hostile one cannot make
#: the decoder reserve 128 MiB, zstd's default limit).
_MAX_WINDOW: Final = MAX_CHUNK_SIZE


def available() -> bool:
    """Whether this side can compress and expand zstd chunks."""
    return _zstd is not None


def compress_chunk(data: bytes | bytearray | memoryview, level: int = LEVEL) -> bytes | None:
    """``data`` as one zstd frame (content size declared), or None.

    None when compression saves less than :data:`MIN_SAVING`, or zstandard is
    not installed: the chunk then travels as plain DATA.
    """
    if _zstd is None or not data:
        return None
    packed: bytes = _zstd.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if len(packed) > len(data) * (1 - MIN_SAVING):
        return None
    return packed


def decompress_chunk(payload: bytes | bytearray | memoryview, length: int) -> bytes:
    """The ``length`` bytes one DATA_ZSTD payload expands to (§2.3.1).

    The zstd frame header must declare exactly ``length`` as its content size,
    and the payload must be that one frame and nothing after it. The decoder
    never writes more than the declared size (zstd checks the content size as
    it decodes), so a bomb costs at most ``length`` bytes plus one block.
    Raises :class:`FrameError` (close code 1002) for anything else, and when
    zstandard is not installed (a peer sent DATA_ZSTD we never announced).
    """
    if _zstd is None:
        raise FrameError("DATA_ZSTD frame received, but this side cannot decode zstd")
    try:
        declared = _zstd.frame_content_size(payload)
    except _zstd.ZstdError as e:
        raise FrameError(f"DATA_ZSTD payload is not a zstd frame: {e}") from e
    if declared != length:
        raise FrameError(
            f"DATA_ZSTD frame declares {declared} bytes, the chunk is {length} bytes"
            if declared >= 0
            else "DATA_ZSTD frame does not declare its content size"
        )
    decoder = _zstd.ZstdDecompressor(max_window_size=_MAX_WINDOW).decompressobj()
    try:
        data: bytes = decoder.decompress(payload)
    except _zstd.ZstdError as e:
        raise FrameError(f"DATA_ZSTD payload does not decode: {e}") from e
    if not decoder.eof or decoder.unused_data or len(data) != length:
        raise FrameError(
            f"DATA_ZSTD payload expands to {len(data)} bytes"
            f"{' plus trailing bytes' if decoder.unused_data else ''}"
            f"{'' if decoder.eof else ' (truncated frame)'}, the chunk is {length} bytes"
        )
    return data
