"""Content-defined chunks and DATA_ZSTD (PROTOCOL.md §7.3.3, §2.3.1; issue 14, item 4)."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
from fleetpush.protocol import codec
from fleetpush.protocol.compression import MIN_SAVING, compress_chunk, decompress_chunk
from fleetpush.protocol.errors import FrameError, FrameTooLarge, ManifestError
from fleetpush.protocol.frames import (
    DATA_HEADER_SIZE,
    PROTOCOL_VERSION,
    DataFrame,
    FrameDecoder,
    encode_data_frame_header,
)
from fleetpush.protocol.handshake import VARIABLE_CHUNKS, ZSTD, can_fetch_chunks
from fleetpush.protocol.limits import MAX_ARRAY_LEN, MAX_CHUNK_SIZE
from fleetpush.protocol.manifest import FileEntry, Manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import iter_bytes

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX = 65536


def _entry(data: bytes, sizes: list[int] | None, path: str = "bin/app") -> FileEntry:
    if sizes is None:
        cuts = [(o, min(MAX, len(data) - o)) for o in range(0, len(data), MAX)]
    else:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        cuts = list(zip(starts, sizes, strict=True))
    return FileEntry(
        path=path,
        size=len(data),
        mode=0o644,
        digest=hashlib.sha256(data).digest(),
        chunks=[hashlib.sha256(data[o : o + n]).digest() for o, n in cuts],
        sizes=sizes,
    )


def _manifest(*files: FileEntry) -> Manifest:
    return Manifest(app="a", version="1.0", sequence=1, created=1, chunk_size=MAX, files=[*files])


# --- FileEntry.sizes: encoding, spans, validation (§7.3.3) -----------------------------


def test_a_fixed_manifest_keeps_its_bytes_no_sizes_key() -> None:
    raw = codec.unpackb(_manifest(_entry(bytes(100_000), None)).to_bytes())
    assert "sizes" not in raw["files"][0]
    assert set(raw["files"][0]) == {"path", "size", "mode", "digest", "chunks"}


def test_variable_sizes_round_trip_and_give_the_spans() -> None:
    data = bytes(range(256)) * 40
    m = _manifest(_entry(data, [1, 4000, 6239]))
    decoded = Manifest.from_bytes(m.to_bytes())
    assert decoded == m
    assert decoded.to_bytes() == m.to_bytes()
    f = decoded.files[0]
    assert decoded.variable_chunks
    assert f.chunk_count(MAX) == 3
    assert [f.chunk_span(MAX, i) for i in range(3)] == [(0, 1), (1, 4000), (4001, 6239)]
    assert [f.chunk_length(MAX, i) for i in range(3)] == [1, 4000, 6239]


def test_fixed_spans_are_unchanged() -> None:
    f = _entry(bytes(MAX * 2 + 5), None)
    assert f.chunk_count(MAX) == 3
    assert [f.chunk_span(MAX, i) for i in range(3)] == [(0, MAX), (MAX, MAX), (2 * MAX, 5)]
    assert not _manifest(f).variable_chunks


@pytest.mark.parametrize("index", [-1, 3])
def test_a_span_outside_the_file_is_an_index_error(index: int) -> None:
    with pytest.raises(IndexError):
        _entry(bytes(10), [3, 3, 4]).chunk_span(MAX, index)


LIES: dict[str, tuple[list[int], str]] = {
    "sizes add up to more than the file": ([5, 6], "add up to 11, not its size 10"),
    "sizes add up to less than the file": ([5, 4], "add up to 9, not its size 10"),
    "a zero size": ([0, 10], "in [1, 65536]"),
    "a negative size": ([-5, 15], "in [1, 65536]"),
    "a size above the manifest's chunk_size": ([MAX + 1, -MAX + 9], "in [1, 65536]"),
}


@pytest.mark.parametrize("case", LIES)
def test_sizes_that_lie_are_refused(case: str) -> None:
    sizes, words = LIES[case]
    good = _entry(bytes(10), [5, 5])
    entry = FileEntry(
        path=good.path, size=10, mode=0o644, digest=good.digest, chunks=good.chunks, sizes=sizes
    )
    with pytest.raises(ManifestError, match=words.replace("[", r"\[").replace("]", r"\]")):
        _manifest(entry).to_bytes()


def test_sizes_and_chunk_digests_must_pair_up() -> None:
    good = _entry(bytes(10), [5, 5])
    entry = FileEntry(
        path=good.path, size=10, mode=0o644, digest=good.digest, chunks=good.chunks, sizes=[10]
    )
    with pytest.raises(ManifestError, match="2 chunk digests for 1 sizes"):
        _manifest(entry).to_bytes()


def test_lying_sizes_in_received_bytes_are_refused_on_decode() -> None:
    raw = codec.unpackb(_manifest(_entry(bytes(10), [5, 5])).to_bytes())
    raw["files"][0]["sizes"] = [5, 6]
    with pytest.raises(ManifestError, match="add up to 11"):
        Manifest.from_bytes(codec.packb(raw))


def test_sizes_of_the_wrong_type_are_refused_on_decode() -> None:
    raw = codec.unpackb(_manifest(_entry(bytes(10), [5, 5])).to_bytes())
    raw["files"][0]["sizes"] = ["5", "5"]
    with pytest.raises(ManifestError):
        Manifest.from_bytes(codec.packb(raw))


@FAST
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(1, 400), max_size=20))
def test_any_valid_cut_round_trips(data: bytes, cuts: list[int]) -> None:
    sizes: list[int] = []
    left = len(data)
    for n in cuts:
        if left == 0:
            break
        sizes.append(min(n, left))
        left -= sizes[-1]
    if left:
        sizes.append(left)
    m = _manifest(_entry(data, sizes))
    decoded = Manifest.from_bytes(m.to_bytes())
    assert decoded == m
    f = decoded.files[0]
    joined = b"".join(
        data[o : o + n] for o, n in (f.chunk_span(MAX, i) for i in range(len(f.chunks)))
    )
    assert joined == data


# --- capabilities and version (§5.1, §7.3.3) -------------------------------------------


def test_protocol_minor_is_1_1() -> None:
    assert PROTOCOL_VERSION == "1.1"


def test_variable_chunks_need_the_capability() -> None:
    assert (VARIABLE_CHUNKS, ZSTD) == ("chunks-v", "zstd")
    assert can_fetch_chunks([], variable=False)
    assert not can_fetch_chunks(["blake3", "zstd"], variable=True)
    assert can_fetch_chunks(["chunks-v"], variable=True)


# --- DATA_ZSTD frames (§2.3.1): every parser case three ways ---------------------------

PLAIN = b"fleetpush chunk " * 4096  # 64 KiB: the body is collected in a buffer of its own
PACKED = compress_chunk(PLAIN)
assert PACKED is not None
TRAILER = encode_data_frame_header(1, 0, 0, 3) + b"abc"


def _frame(payload: bytes, stream: int = 7, file: int = 2, chunk: int = 5) -> bytes:
    return encode_data_frame_header(stream, file, chunk, len(payload), compressed=True) + payload


def _decode(data: bytes, how: str) -> list[Any]:
    decoder = FrameDecoder()
    out = []
    pieces = list(iter_bytes(data)) if how == "bytewise" else [data]
    if how == "trailing":
        pieces = [data + TRAILER]
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    return out


@pytest.mark.parametrize("how", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize("payload", [PACKED, PACKED[:20], b""], ids=["chunk", "small", "empty"])
def test_data_zstd_frame_decodes(payload: bytes, how: str) -> None:
    frames = _decode(_frame(payload), how)
    assert frames[0] == DataFrame(7, 2, 5, memoryview(payload), compressed=True)
    if how == "trailing":
        assert frames[1] == DataFrame(1, 0, 0, memoryview(b"abc"))
        assert not frames[1].compressed
    assert len(frames) == (2 if how == "trailing" else 1)


def test_data_zstd_header_is_data_with_type_3() -> None:
    header = encode_data_frame_header(1, 2, 3, 10, compressed=True)
    assert header[:4] == b"FP\x01\x03"
    assert struct.unpack(">I", header[4:8])[0] == DATA_HEADER_SIZE + 10
    assert header[8:] == encode_data_frame_header(1, 2, 3, 10)[8:]


@pytest.mark.parametrize("how", ["whole", "bytewise", "trailing"])
def test_data_zstd_over_the_chunk_limit_is_refused_from_its_header(how: str) -> None:
    header = b"FP\x01\x03" + struct.pack(">I", DATA_HEADER_SIZE + MAX_CHUNK_SIZE + 1)
    with pytest.raises(FrameTooLarge):
        _decode(header, how)


def test_data_zstd_limit_follows_the_negotiated_chunk_size() -> None:
    decoder = FrameDecoder(max_chunk_size=1024)
    decoder.feed(_frame(bytes(1025)))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_the_encoder_refuses_an_oversized_compressed_payload() -> None:
    with pytest.raises(FrameTooLarge):
        encode_data_frame_header(1, 0, 0, MAX_CHUNK_SIZE + 1, compressed=True)


# --- decompress_chunk: a hostile payload is a protocol error (specs/THREATS.md) ---------


def test_compress_then_decompress_gives_the_chunk() -> None:
    assert PACKED is not None and len(PACKED) < len(PLAIN) * (1 - MIN_SAVING)
    assert decompress_chunk(PACKED, len(PLAIN)) == PLAIN
    assert decompress_chunk(memoryview(PACKED), len(PLAIN)) == PLAIN


def test_incompressible_chunks_stay_plain() -> None:
    noise = hashlib.sha256(b"seed").digest() * 1  # 32 bytes: zstd adds a header
    assert compress_chunk(noise) is None
    assert compress_chunk(b"") is None


def _with_declared_size(frame: bytes, size: int) -> bytes:
    """``frame`` (from compress_chunk) with its 2-byte content size field rewritten.

    zstd encodes a content size of 256..65791 in 2 bytes as size - 256; the
    field follows the 4-byte magic and the 1-byte frame header descriptor.
    """
    assert frame[4] >> 6 == 1, "expects a 2-byte content size field"
    return frame[:5] + struct.pack("<H", size - 256) + frame[7:]


HOSTILE: dict[str, tuple[bytes, int, str]] = {
    "declares more than the chunk (a bomb)": (PACKED, len(PLAIN) - 1, "declares 65536"),
    "declares less than the chunk": (PACKED, len(PLAIN) + 1, "declares 65536"),
    "lies in its header: declares the chunk, holds more": (
        _with_declared_size(PACKED, 1000),
        1000,
        "does not decode",
    ),
    "bytes after the frame": (PACKED + b"\x00", len(PLAIN), "trailing bytes"),
    "two frames": (PACKED + PACKED, len(PLAIN), "trailing bytes"),
    "a truncated frame": (PACKED[:-4], len(PLAIN), "truncated|does not decode"),
    "not zstd at all": (b"not a zstd frame", 16, "not a zstd frame"),
    "empty": (b"", 0, "not a zstd frame"),
    "no content size declared": (
        bytes.fromhex("28b52ffd0058610000666c656574"),
        6,
        "does not declare its content size",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_payload_is_a_frame_error(case: str) -> None:
    payload, length, words = HOSTILE[case]
    with pytest.raises(FrameError, match=words) as info:
        decompress_chunk(payload, length)
    assert info.value.close_code == 1002


def test_a_file_of_more_chunks_than_a_receiver_decodes_is_refused() -> None:
    # §10: MAX_ARRAY_LEN bounds every array a receiver decodes, chunk lists included
    # (about 6 GiB of 64 KiB content-defined chunks).
    n = MAX_ARRAY_LEN + 1
    digest = hashlib.sha256(b"").digest()
    entry = FileEntry(
        path="huge", size=n, mode=0o644, digest=digest, chunks=[digest] * n, sizes=[1] * n
    )
    with pytest.raises(ManifestError, match="more than the 100000"):
        _manifest(entry).to_bytes()
