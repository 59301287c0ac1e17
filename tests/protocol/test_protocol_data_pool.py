"""DATA bodies received into reusable pooled buffers (protocol/buffers.py, issue 14 item 1).

Whatever way the bytes arrive, a decoder with a pool gives the same frames as
one without; a buffer is reused only once nothing refers to its frame; the
pool never holds more than its limit, and past it frames still decode.
"""

from __future__ import annotations

import os

from fleetpush.protocol import FrameDecoder
from fleetpush.protocol.buffers import DataPool
from fleetpush.protocol.frames import DataFrame, encode_data_frame_header, encode_message_frame
from hypothesis import given, settings
from hypothesis import strategies as st

PAYLOADS = [os.urandom(n) for n in (300_000, 1, 70_000, 300_000, 5)]
WIRE = b"".join(
    encode_data_frame_header(1, i, i, len(p)) + p + encode_message_frame(b"\x90")
    for i, p in enumerate(PAYLOADS)
)


def _drain(decoder: FrameDecoder) -> list[object]:
    out: list[object] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 120_000), min_size=1, max_size=20), keep=st.booleans())
def test_pooled_frames_equal_the_sent_payloads(sizes: list[int], keep: bool) -> None:
    pool = DataPool(4 * 1024 * 1024)
    decoder = FrameDecoder(data_pool=pool)
    got: list[bytes] = []
    kept: list[DataFrame] = []
    pos = i = 0
    while pos < len(WIRE):
        size = sizes[i % len(sizes)]
        i += 1
        room = decoder.body_buffer()
        if room is not None:
            n = min(size, len(room), len(WIRE) - pos)
            room[:n] = WIRE[pos : pos + n]
            del room
            decoder.body_filled(n)
        else:
            n = min(size, len(WIRE) - pos)
            decoder.feed(WIRE[pos : pos + n])
        pos += n
        for frame in _drain(decoder):
            if isinstance(frame, DataFrame):
                got.append(bytes(frame.payload))
                if keep:  # a consumer still holding frames: their buffers are not reused
                    kept.append(frame)
    assert got == PAYLOADS
    if keep:
        assert [bytes(f.payload) for f in kept] == PAYLOADS
    assert pool.allocated <= pool.limit


def test_a_buffer_is_reused_only_once_its_frame_is_dropped() -> None:
    # ids, not the buffers, go into the asserts: pytest's assertion rewriting
    # keeps the values it compared, which would keep the buffers in use.
    pool = DataPool(4 * 1024 * 1024)
    a = pool.acquire(100_000)
    view = memoryview(a or b"")[10:20]
    a_id = id(a)
    b_id = id(pool.acquire(100_000))  # a new one: a is viewed (and named)
    assert b_id != a_id
    c_id = id(pool.acquire(50_000))  # the second one, free again, is reused
    assert c_id == b_id
    del view, a
    d_id = id(pool.acquire(100_000))
    assert d_id in (a_id, b_id)
    assert pool.in_use == 0
    assert pool.allocated == 2 * 128 * 1024


def test_past_its_limit_the_pool_declines_and_the_decoder_still_decodes() -> None:
    pool = DataPool(128 * 1024)
    decoder = FrameDecoder(data_pool=pool)
    decoder.feed(WIRE)
    frames = [f for f in _drain(decoder) if isinstance(f, DataFrame)]
    assert [bytes(f.payload) for f in frames] == PAYLOADS
    assert pool.allocated <= 128 * 1024


def test_following_the_receive_hint_puts_every_later_payload_byte_in_place() -> None:
    """A transport that receives what receive_hint() asks (else 256 KiB) and
    fills body_buffer() in place feeds the shared buffer headers only, once
    chunks flow: no payload byte is copied on its way to its pooled buffer."""
    payloads = [os.urandom(n) for n in (600_000, 700_000, 1_000_000, 524_288)]
    wire = b"".join(encode_data_frame_header(1, 0, i, len(p)) + p for i, p in enumerate(payloads))
    decoder = FrameDecoder(data_pool=DataPool(8 * 1024 * 1024))
    got: list[bytes] = []
    fed: list[int] = []
    pos = 0
    while pos < len(wire):
        room = decoder.body_buffer()
        if room is not None:
            n = min(len(room), len(wire) - pos)
            room[:n] = wire[pos : pos + n]
            del room
            decoder.body_filled(n)
        else:
            n = min(decoder.receive_hint() or 256 * 1024, len(wire) - pos)
            decoder.feed(wire[pos : pos + n])
            fed.append(n)
        pos += n
        got += [bytes(f.payload) for f in _drain(decoder) if isinstance(f, DataFrame)]
    assert got == payloads
    # the first receive takes what comes (256 KiB); after it, headers only (20 bytes each)
    # (chunks of 512 KiB and more; smaller ones are cheaper copied, see frames.py)
    assert fed[0] == 256 * 1024 and set(fed[1:]) <= {20}
