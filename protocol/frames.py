"""Frame layer: fixed header, message frames and zero-copy data frames.

Layout (specs/PROTOCOL.md §2), all integers big-endian::

    header  = magic "FP" (2) | major version u8 | frame type u8 | body length u32
    MESSAGE = header | msgpack body
    DATA    = header | stream u32 | file index u32 | chunk index u32 | payload
    DATA_ZSTD = the same as DATA, with one zstd frame as the payload (§2.3.1)

The body length is checked against the limit for the frame type *before* any
body byte is buffered, and the buffer of a large body grows with the bytes that
actually arrive, never to the declared length at once: a peer cannot make us
allocate by lying about it (issue 10, item 3: 300 eight-byte headers declaring
8 MiB each used to cost 2.4 GiB). Data frames carry chunk bytes raw, after a
fixed binary sub-header, so a 1 MiB chunk is received straight into its own
buffer (at most two small early copies as that buffer grows) and then handed
out as a ``memoryview`` (never re-packed by msgpack).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

import attrs

from .buffers import DataPool
from .errors import FrameError, FrameTooLarge, VersionMismatch
from .limits import MAX_CHUNK_SIZE, MAX_MESSAGE_BODY

MAGIC: Final = b"FP"
PROTOCOL_MAJOR: Final = 1
#: 1.1 added content-defined chunks and DATA_ZSTD (§7.3.3, §2.3.1), both
#: used only with a peer that announced them: 1.0 peers still interoperate.
PROTOCOL_MINOR: Final = 1
PROTOCOL_VERSION: Final = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"

HEADER: Final = struct.Struct(">2sBBI")
DATA_HEADER: Final = struct.Struct(">III")
HEADER_SIZE: Final = HEADER.size  # 8
DATA_HEADER_SIZE: Final = DATA_HEADER.size  # 12

#: Bodies at least this long are collected into a buffer of their own as they
#: arrive, instead of waiting in the shared receive buffer.
_DIRECT_BODY_THRESHOLD: Final = 64 * 1024

#: The first buffer of such a body, and how it grows when full: x4, straight
#: to the declared length once that is within 4/3 of the next size (a 1 MiB
#: chunk: 64 KiB, 256 KiB, then its full length). So a body holds at most
#: ~5.3 times the bytes received, and an honest chunk costs two small copies.
_FIRST_BODY_ALLOC: Final = 64 * 1024
_BODY_GROWTH: Final = 4

#: receive_hint() asks for headers only after chunks of at least this size:
#: measured (scripts/download_cpu.py), 1 MiB chunks cost 30% less device CPU
#: with it, content-defined ones (~64 KiB) 15% more (a receive call per chunk).
_HINT_MIN_CHUNK: Final = 512 * 1024


class BodyBudget:
    """Bytes that partial large frame bodies may hold, shared by many decoders.

    The releaser passes one to every connection (issue 10, item 3): growing
    buffers bound what each peer holds by what it sent, and this bounds what
    all of them hold together. A decoder takes from it as its body buffer
    grows and gives back when the frame completes, fails, or the decoder is
    :meth:`FrameDecoder.release`-d; when it is spent, the frame that wanted
    more fails with :class:`FrameTooLarge` (close code 1009).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class FrameType(IntEnum):
    MESSAGE = 0x01
    DATA = 0x02
    #: §2.3.1 (protocol 1.1): a chunk compressed with zstd, only sent to a
    #: device that announced the "zstd" capability.
    DATA_ZSTD = 0x03


#: Frame types that carry a chunk after the 12-byte sub-header.
_CHUNK_TYPES: Final = (FrameType.DATA, FrameType.DATA_ZSTD)


@attrs.frozen
class MessageFrame:
    """A frame whose body is one msgpack-encoded message."""

    body: bytes


@attrs.frozen(eq=False)
class DataFrame:
    """A frame carrying one chunk of a file, in answer to ``get_chunks``.

    ``compressed``: it came as DATA_ZSTD, so ``payload`` is one zstd frame the
    receiver must expand to exactly the chunk's length (compression.py, §2.3.1).
    """

    stream: int
    file: int
    chunk: int
    payload: memoryview
    compressed: bool = False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataFrame):
            return NotImplemented
        return (self.stream, self.file, self.chunk, self.compressed, bytes(self.payload)) == (
            other.stream,
            other.file,
            other.chunk,
            other.compressed,
            bytes(other.payload),
        )

    __hash__ = None  # type: ignore[assignment]


Frame = MessageFrame | DataFrame


def encode_message_frame(body: bytes) -> bytes:
    """Frame a msgpack body. Raises :class:`FrameTooLarge` past the limit."""
    if len(body) > MAX_MESSAGE_BODY:
        raise FrameTooLarge(f"message body of {len(body)} bytes exceeds {MAX_MESSAGE_BODY}")
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, len(body)) + body


def encode_data_frame_header(
    stream: int, file: int, chunk: int, payload_len: int, *, compressed: bool = False
) -> bytes:
    """The 20 header bytes that precede a chunk payload sent as-is.

    Returned separately so adapters can send header and payload without
    concatenating them (no copy of the payload). ``compressed``: a DATA_ZSTD
    frame, whose payload is bounded by the same limit (§2.3.1).
    """
    if payload_len > MAX_CHUNK_SIZE:
        raise FrameTooLarge(f"chunk of {payload_len} bytes exceeds {MAX_CHUNK_SIZE}")
    ftype = FrameType.DATA_ZSTD if compressed else FrameType.DATA
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, ftype, DATA_HEADER_SIZE + payload_len) + (
        DATA_HEADER.pack(stream, file, chunk)
    )


class FrameDecoder:
    """Incremental frame parser: ``feed(bytes)`` then ``next_frame()``.

    ``feed(b"")`` signals end of input. ``next_frame()`` returns a frame,
    ``None`` when more bytes are needed, and raises :class:`FrameError` (or a
    subclass) when the input is malformed, or :class:`FrameTooLarge` when a
    shared ``budget`` cannot cover a growing body; after an error the decoder
    is dead and ``feed`` drops what it is given.
    """

    def __init__(
        self,
        max_message_body: int = MAX_MESSAGE_BODY,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        budget: BodyBudget | None = None,
        data_pool: DataPool | None = None,
    ) -> None:
        self._budget = budget
        # The device's: DATA bodies go into reusable buffers (buffers.py).
        self._pool = data_pool
        self._pooled = False  # whether _body's buffer came from the pool
        self._chunks_flowing = False  # the last frame header was a chunk's (receive_hint)
        self._last_chunk = 0  # and its body length
        self._max = {
            FrameType.MESSAGE: max_message_body,
            FrameType.DATA: DATA_HEADER_SIZE + max_chunk_size,
            # A compressed chunk is bounded like a raw one (§2.3.1): the
            # releaser sends DATA_ZSTD only when it is smaller.
            FrameType.DATA_ZSTD: DATA_HEADER_SIZE + max_chunk_size,
        }
        self._buf = bytearray()
        self._pos = 0
        # A large body being collected in place: its type, buffer (which
        # grows, see _grown), bytes filled and declared length.
        self._body: tuple[FrameType, bytearray, int, int] | None = None
        self._eof = False
        self._error: FrameError | None = None

    @property
    def max_message_body(self) -> int:
        return self._max[FrameType.MESSAGE]

    @max_message_body.setter
    def max_message_body(self, value: int) -> None:
        # Raised once the handshake completes (specs/PROTOCOL.md §10).
        self._max[FrameType.MESSAGE] = value

    @property
    def max_chunk_size(self) -> int:
        return self._max[FrameType.DATA] - DATA_HEADER_SIZE

    @max_chunk_size.setter
    def max_chunk_size(self, value: int) -> None:
        self._max[FrameType.DATA] = DATA_HEADER_SIZE + value
        self._max[FrameType.DATA_ZSTD] = DATA_HEADER_SIZE + value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        pending = len(self._buf) - self._pos
        if self._body is not None:
            pending += self._body[2]
        return pending

    @property
    def allocated(self) -> int:
        """Bytes this decoder holds in buffers (for memory accounting and tests)."""
        held = len(self._buf)
        if self._body is not None:
            held += len(self._body[1])
        return held

    @property
    def at_eof(self) -> bool:
        return self._eof

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            if data:
                raise FrameError("data fed after end of input")
            return
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return  # dead: next_frame() raises the error
        view = memoryview(data)
        if self._body is not None:
            ftype, body, filled, length = self._body
            take = min(length - filled, len(view))
            try:
                body = self._grow(body, filled, filled + take, length)
            except FrameError as e:
                self._fail(e)
                return
            body[filled : filled + take] = view[:take]
            self._body = (ftype, body, filled + take, length)
            view = view[take:]
        if view:
            self._buf += view

    def body_buffer(self) -> memoryview | None:
        """The unfilled rest of a large frame body being collected, or None.

        A transport may receive straight into it (``recv_into``) and then call
        :meth:`body_filled`, which spares a copy and an allocation per
        receive for every chunk payload. ``feed`` stays the general path.
        """
        if self._body is None or self._eof or self._error is not None:
            return None
        ftype, body, filled, length = self._body
        if filled >= length:
            return None
        if filled == len(body):  # full but the body is not: grow before receiving
            try:
                body = self._grow(body, filled, filled + 1, length)
            except FrameError as e:
                self._fail(e)
                return None
            self._body = (ftype, body, filled, length)
        return memoryview(body)[filled:length]

    @property
    def data_pool(self) -> DataPool | None:
        return self._pool

    def receive_hint(self) -> int | None:
        """How many bytes to receive next so that a chunk is received only in place.

        While chunks are flowing into pooled buffers, a transport that asks for
        just the next frame's header and sub-header (20 bytes) gets no payload
        bytes in the shared buffer, which would then be copied into the pooled
        one: every payload byte is received once, straight where it is hashed
        and written from (issue 14, item 1). None: no preference.
        """
        if self._pool is None or not self._chunks_flowing or self._body is not None:
            return None
        if self._last_chunk < _HINT_MIN_CHUNK:
            return None  # small chunks: a copy costs less than a receive call each
        want = HEADER_SIZE + DATA_HEADER_SIZE - (len(self._buf) - self._pos)
        return want if want > 0 else None

    def body_filled(self, n: int) -> None:
        """Record ``n`` bytes written into :meth:`body_buffer` (``n`` > 0)."""
        if self._body is None:
            raise FrameError("body_filled() without a body being collected")
        ftype, body, filled, length = self._body
        room = min(len(body), length) - filled
        if not 0 < n <= room:
            raise FrameError(f"body_filled({n}) with {room} bytes of room")
        self._body = (ftype, body, filled + n, length)

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next_frame()
        except FrameError as e:
            self._fail(e)
            raise

    def release(self) -> None:
        """Give back what a partial body holds; the decoder is dead afterwards.

        For the transport to call when the connection ends, whatever way it
        ends: a :class:`BodyBudget` is not refilled by garbage collection.
        """
        self._fail(FrameError("the decoder was released"))

    def _fail(self, error: FrameError) -> None:
        if self._error is None:
            self._error = error
        if self._body is not None:
            if self._budget is not None and not self._pooled:
                self._budget.give(len(self._body[1]))
            self._body = None

    def _grow(self, body: bytearray, filled: int, need: int, length: int) -> bytearray:
        grown = _grown(body, filled, need, length)
        budget = self._budget
        if budget is None or grown is body or self._pooled:
            return grown
        if not budget.take(len(grown) - len(body)):
            raise FrameTooLarge(
                f"partial frames of all connections hold {budget.used} bytes,"
                f" the limit is {budget.limit}"
            )
        return grown

    def _next_frame(self) -> Frame | None:
        if self._body is not None:
            ftype, body, filled, length = self._body
            if filled < length:
                self._need_more()
                return None
            self._body = None
            if self._budget is not None and not self._pooled:
                self._budget.give(len(body))
            return _make_frame(ftype, bytes(body) if ftype is FrameType.MESSAGE else body, length)
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            self._need_more()
            return None
        ftype, length = self._parse_header()
        self._chunks_flowing = ftype in _CHUNK_TYPES
        if self._chunks_flowing:
            self._last_chunk = length
        start = self._pos + HEADER_SIZE
        pooled = None
        if ftype in _CHUNK_TYPES and self._pool is not None:
            pooled = self._pool.acquire(length)
        if pooled is not None:
            # One copy of what already arrived; the rest is received in place.
            have = min(avail - HEADER_SIZE, length)
            with memoryview(self._buf) as view:  # released before _consume resizes _buf
                pooled[:have] = view[start : start + have]
            self._consume(HEADER_SIZE + have)
            if have == length:
                return _make_frame(ftype, pooled, length)
            self._body = (ftype, pooled, have, length)
            self._pooled = True
            return None
        if avail - HEADER_SIZE >= length:
            body_bytes = bytes(self._buf[start : start + length])
            self._consume(HEADER_SIZE + length)
            return _make_frame(ftype, body_bytes, length)
        if length >= _DIRECT_BODY_THRESHOLD:
            have = avail - HEADER_SIZE
            body = self._grow(bytearray(), 0, have, length)
            body[:have] = self._buf[start : start + have]
            self._consume(avail)
            self._body = (ftype, body, have, length)
            self._pooled = False
        self._need_more()
        return None

    def _parse_header(self) -> tuple[FrameType, int]:
        magic, major, raw_type, length = HEADER.unpack_from(self._buf, self._pos)
        if magic != MAGIC:
            raise FrameError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
        if major != PROTOCOL_MAJOR:
            raise VersionMismatch(
                f"peer speaks fleetpush protocol {major}.x, this side speaks {PROTOCOL_VERSION}"
            )
        try:
            ftype = FrameType(raw_type)
        except ValueError:
            raise FrameError(f"unknown frame type 0x{raw_type:02x}") from None
        limit = self._max[ftype]
        if length > limit:
            raise FrameTooLarge(f"{ftype.name} frame declares {length} bytes, limit is {limit}")
        if ftype in _CHUNK_TYPES and length < DATA_HEADER_SIZE:
            raise FrameError(f"{ftype.name} frame of {length} bytes is shorter than its sub-header")
        return ftype, length

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _need_more(self) -> None:
        if self._eof and self.buffered:
            raise FrameError(f"connection closed inside a frame ({self.buffered} bytes pending)")


def _grown(body: bytearray, filled: int, need: int, length: int) -> bytearray:
    """``body`` with room for ``need`` bytes, grown geometrically up to ``length``.

    A new buffer is allocated and the filled part copied, never a resize in
    place: a transport may still hold a memoryview of the old buffer
    (:meth:`FrameDecoder.body_buffer`), which would make a resize fail.
    """
    if need <= len(body):
        return body
    size = max(need, _FIRST_BODY_ALLOC, len(body) * _BODY_GROWTH)
    if size * 4 >= length * 3:
        size = length
    grown = bytearray(min(size, length))
    grown[:filled] = memoryview(body)[:filled]
    return grown


def _make_frame(ftype: FrameType, body: bytes | bytearray, length: int) -> Frame:
    """The frame of the first ``length`` bytes of ``body`` (a pooled buffer may be longer)."""
    if ftype is FrameType.MESSAGE:
        return MessageFrame(bytes(body))
    stream, file, chunk = DATA_HEADER.unpack_from(body, 0)
    return DataFrame(
        stream,
        file,
        chunk,
        memoryview(body)[DATA_HEADER_SIZE:length],
        compressed=ftype is FrameType.DATA_ZSTD,
    )
