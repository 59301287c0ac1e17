"""Receiving a large DATA body in place (FrameDecoder.body_buffer / body_filled).

The trio adapter receives chunk payloads straight into the decoder's body
buffer (``recv_into``) instead of feeding copies; whatever way the bytes
arrive, the frames must be the same as with ``feed`` alone.
"""

from __future__ import annotations

import os

import pytest
from fleetpush.protocol import FrameDecoder, FrameError
from fleetpush.protocol.frames import (
    DataFrame,
    MessageFrame,
    encode_data_frame_header,
    encode_message_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

PAYLOAD = os.urandom(300_000)
WIRE = (
    encode_message_frame(b"\x90")
    + encode_data_frame_header(7, 1, 2, len(PAYLOAD))
    + PAYLOAD
    + encode_message_frame(b"\x91\x01")
)


def _frames(decoder: FrameDecoder) -> list[object]:
    out: list[object] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def _summary(frames: list[object]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for f in frames:
        if isinstance(f, DataFrame):
            out.append(("data", f.stream, f.file, f.chunk, bytes(f.payload)))
        else:
            assert isinstance(f, MessageFrame)
            out.append(("message", f.body))
    return out


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 70_000), min_size=1, max_size=40))
def test_in_place_receive_gives_the_frames_feed_gives(sizes: list[int]) -> None:
    reference = FrameDecoder()
    reference.feed(WIRE)
    want = _summary(_frames(reference))

    decoder = FrameDecoder()
    got: list[object] = []
    pos = 0
    i = 0
    while pos < len(WIRE):
        size = sizes[i % len(sizes)]
        i += 1
        room = decoder.body_buffer()
        if room is not None:
            n = min(size, len(room), len(WIRE) - pos)
            room[:n] = WIRE[pos : pos + n]
            decoder.body_filled(n)
        else:
            n = min(size, len(WIRE) - pos)
            decoder.feed(WIRE[pos : pos + n])
        pos += n
        got += _frames(decoder)
    assert _summary(got) == want
    assert decoder.body_buffer() is None and decoder.buffered == 0


def test_no_body_buffer_outside_a_large_body() -> None:
    decoder = FrameDecoder()
    assert decoder.body_buffer() is None
    decoder.feed(WIRE[:13])  # a whole small message frame and half a frame header
    assert _frames(decoder) and decoder.body_buffer() is None


def test_overfilling_the_body_buffer_is_refused() -> None:
    decoder = FrameDecoder()
    header = encode_data_frame_header(1, 0, 0, len(PAYLOAD))
    decoder.feed(header + PAYLOAD[:1000])
    assert decoder.next_frame() is None
    room = decoder.body_buffer()
    # The room is what is left of the buffer allocated so far, which grows with
    # the bytes received and never past the declared length (issue 10, item 3).
    assert room is not None and 0 < len(room) <= len(PAYLOAD) - 1000
    with pytest.raises(FrameError):
        decoder.body_filled(len(room) + 1)
    with pytest.raises(FrameError):
        decoder.body_filled(0)


def test_body_filled_without_a_body_is_refused() -> None:
    with pytest.raises(FrameError):
        FrameDecoder().body_filled(10)


def test_no_body_buffer_after_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_data_frame_header(1, 0, 0, len(PAYLOAD)) + PAYLOAD[:100_000])
    assert decoder.next_frame() is None and decoder.body_buffer() is not None
    decoder.feed(b"")
    assert decoder.body_buffer() is None
    with pytest.raises(FrameError):
        decoder.next_frame()
