"""Property tests: every catalogued message round-trips; garbage only raises our errors.

``decode(encode(m)) == m`` is checked through a real client/server Connection
pair, so the envelope, the canonical msgpack and the typed conversion are all
exercised. The fuzz tests hold h11's invariant: arbitrary bytes make the
protocol raise :class:`FleetpushError` (never anything else) or wait for more.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs
import pytest
from fleetpush.protocol import (
    METHODS,
    NEED_DATA,
    ChunkReceived,
    Connection,
    ConnectionClosed,
    FleetpushError,
    FrameDecoder,
    FrameError,
    NotificationReceived,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    Side,
    VersionMismatch,
    codec,
)
from fleetpush.protocol.frames import HEADER, MAGIC, PROTOCOL_MAJOR
from fleetpush.protocol.limits import MAX_CHUNKS_PER_REQUEST, MAX_WIRE_INT
from fleetpush.protocol.messages import (
    MAX_PHASES,
    DeployCreate,
    DeploymentInfo,
    GetChunks,
    Kind,
    MethodSpec,
    float_range,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import ConnectionPair

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies built from the attrs classes ---------------------------------------

INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False)
TEXT = st.text(max_size=24)

# Any msgpack value the protocol accepts (string keys only, lists not tuples).
LEAVES = st.none() | st.booleans() | INTS | FLOATS | TEXT | st.binary(max_size=24)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def for_hint(
    hint: Any, ints: st.SearchStrategy[int] = INTS, floats: st.SearchStrategy[float] = FLOATS
) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([for_hint(a, ints, floats) for a in args])
    if hint is type(None):
        return st.none()
    if hint is Any:
        return VALUES
    if origin is list:
        return st.lists(for_hint(args[0]), max_size=4)
    if origin is tuple:
        return st.tuples(*(for_hint(a) for a in args))
    if origin is dict:
        return st.dictionaries(for_hint(args[0]), for_hint(args[1], ints), max_size=4)
    if isinstance(hint, type) and attrs.has(hint):
        return for_class(hint)
    return {
        bool: st.booleans(),
        int: ints,
        float: floats,
        str: TEXT,
        bytes: st.binary(max_size=32),
    }[hint]


U32 = st.integers(min_value=0, max_value=2**32 - 1)

#: Fields whose validators the generic rules below cannot read.
OVERRIDES: dict[tuple[type, str], st.SearchStrategy[Any]] = {
    (GetChunks, "chunks"): st.lists(st.tuples(U32, U32), max_size=MAX_CHUNKS_PER_REQUEST),
    (DeployCreate, "phases"): st.lists(st.text(max_size=16), max_size=MAX_PHASES),
    (DeploymentInfo, "phases"): st.lists(
        st.integers(0, MAX_WIRE_INT), max_size=MAX_PHASES
    ),
}


def for_field(cls: type, field: attrs.Attribute[Any], hint: Any) -> st.SearchStrategy[Any]:
    if (cls, field.name) in OVERRIDES:
        return OVERRIDES[(cls, field.name)]
    validator = field.validator
    options = getattr(validator, "options", None)
    if options is not None:  # attrs.validators.in_
        return st.sampled_from(list(options))
    # int_range, also inside attrs' optional() and deep_mapping() (messages.py)
    bounded = getattr(validator, "validator", validator)
    bounded = getattr(bounded, "value_validator", bounded)
    if isinstance(bounded, float_range):  # a float's bounds, possibly optional
        strategy = for_hint(hint, floats=st.floats(bounded.lo, bounded.hi))
    elif hasattr(bounded, "lo"):
        strategy = for_hint(hint, st.integers(bounded.lo, bounded.hi))
    else:
        strategy = for_hint(hint)
    max_length = getattr(validator, "max_length", None)
    if max_length is not None:  # attrs.validators.max_len
        strategy = strategy.filter(lambda v: len(v) <= max_length)
    return strategy


def for_class(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: for_field(cls, f, hints[f.name]) for f in attrs.fields(cls) if f.name != "extra"
    }
    return st.builds(cls, **fields)


def _ids(specs: list[MethodSpec]) -> list[str]:
    return [s.name for s in specs]


REQUESTS = [s for s in METHODS.values() if s.kind is Kind.REQUEST]
NOTIFICATIONS = [s for s in METHODS.values() if s.kind is Kind.NOTIFICATION]


def _sender(pair: ConnectionPair, spec: MethodSpec, server_sends: bool) -> Connection:
    if spec.sender == "server" or (spec.sender == "peer" and server_sends):
        return pair.server
    return pair.client


def _pair_for(spec: MethodSpec) -> ConnectionPair:
    """A pair in the state where ``spec`` may be sent, by a client of the right role."""
    pair = ConnectionPair()
    if spec.name == "hello":
        return pair
    if spec.name == "auth":
        pair.hello()
        return pair
    return pair.handshake(role="operator" if spec.sender == "operator" else "device")


def test_catalogue_is_covered() -> None:
    # Every method is either a request or a notification, and the tests below
    # are parametrized over both lists: none can be skipped silently.
    assert {s.name for s in REQUESTS} | {s.name for s in NOTIFICATIONS} == set(METHODS)
    assert {s.sender for s in METHODS.values()} <= {
        "client",
        "device",
        "operator",
        "server",
        "peer",
    }


@pytest.mark.parametrize("spec", REQUESTS, ids=_ids(REQUESTS))
@FAST
@given(data=st.data())
def test_request_and_response_round_trip(spec: MethodSpec, data: st.DataObject) -> None:
    assert spec.result is not None
    params = data.draw(for_class(spec.params), label="params")
    result = data.draw(for_class(spec.result), label="result")
    pair = _pair_for(spec)
    sender = _sender(pair, spec, data.draw(st.booleans(), label="server sends"))
    receiver = pair.peer_of(sender)
    rid, events = pair.request(sender, spec.name, params)
    if spec.name == "ping":
        # Answered by the connection itself (§6.2); the pong reaches us.
        assert events == []
        assert pair.auto_replies(receiver) == [
            ResponseReceived(id=rid, method="ping", result=params)
        ]
        return
    assert events == [RequestReceived(id=rid, method=spec.name, params=params)]
    if spec.name == "get_chunks":
        # The response may only follow a DATA frame for every chunk asked (§7).
        receiver.start_chunks(rid, list(params.chunks))
        for file, chunk in params.chunks:
            payload = f"{file}/{chunk}".encode()
            header = receiver.send_chunk_header(rid, file, chunk, len(payload))
            got = pair.deliver(receiver, header + payload)
            assert len(got) == 1 and isinstance(got[0], ChunkReceived)
            assert (got[0].stream, got[0].file, got[0].chunk) == (rid, file, chunk)
            assert bytes(got[0].payload) == payload
    answer = pair.respond(receiver, rid, result)
    assert answer == [ResponseReceived(id=rid, method=spec.name, result=result)]


@pytest.mark.parametrize("spec", NOTIFICATIONS, ids=_ids(NOTIFICATIONS))
@FAST
@given(data=st.data())
def test_notification_round_trips(spec: MethodSpec, data: st.DataObject) -> None:
    params = data.draw(for_class(spec.params), label="params")
    pair = _pair_for(spec)
    sender = _sender(pair, spec, data.draw(st.booleans(), label="server sends"))
    events = pair.deliver(sender, sender.send_notification(spec.name, params))
    if spec.name == "bye":
        assert events == [ConnectionClosed(code=params.code, reason=params.reason)]
    else:
        assert events == [NotificationReceived(method=spec.name, params=params)]


@FAST
@given(value=VALUES)
def test_codec_round_trips_any_value(value: Any) -> None:
    body = codec.packb(value)
    assert codec.unpackb(body) == value
    assert codec.packb(codec.unpackb(body)) == body  # canonical: a fixed point


@FAST
@given(value=st.dictionaries(TEXT, VALUES, max_size=6))
def test_map_keys_are_sorted_on_the_wire(value: dict[str, Any]) -> None:
    # Inserting keys in any order yields the same bytes (§3.2).
    reordered = dict(reversed(list(value.items())))
    assert codec.packb(value) == codec.packb(reordered)


# --- fuzz: only FleetpushError, never a hang ---------------------------------------


def _frame(frame_type: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, frame_type, len(body)) + body


# Plain garbage rarely gets past the magic; also try well-framed garbage
# bodies and well-framed msgpack of random shape, which reach the decoder,
# the envelope checks and the state machine.
ENVELOPES = st.lists(VALUES, max_size=5) | st.tuples(
    st.sampled_from([0, 1, 2, 3]), st.integers(0, 3), st.sampled_from(sorted(METHODS)), VALUES
).map(list)
FRAMED = st.builds(_frame, st.sampled_from([1, 2]), st.binary(max_size=64)) | st.builds(
    lambda env: _frame(1, codec.packb(env)), ENVELOPES
)
STREAMS = st.lists(st.binary(max_size=64) | FRAMED, max_size=6).map(b"".join)


def _pump_decoder(data: bytes, eof: bool) -> int:
    decoder = FrameDecoder()
    decoder.feed(data)
    if eof:
        decoder.feed(b"")
    frames = 0
    while decoder.next_frame() is not None:
        frames += 1
        assert frames <= len(data) // 8, "more frames than the bytes can hold"
    return frames


@settings(max_examples=300, deadline=None)
@given(data=STREAMS, eof=st.booleans())
def test_frame_decoder_fuzz(data: bytes, eof: bool) -> None:
    try:
        _pump_decoder(data, eof)
    except FleetpushError as e:
        assert isinstance(e, FrameError | VersionMismatch), repr(e)


def _pump_connection(conn: Connection, data: bytes, split: int, eof: bool) -> None:
    pieces = [data[:split], data[split:]] + ([b""] if eof else [])
    steps = 0
    for piece in pieces:
        conn.receive_data(piece, 1.0)
        while conn.next_event() is not NEED_DATA:
            steps += 1
            assert steps <= len(data) // 8 + 1, "next_event produced events from nothing"
    conn.data_to_send()
    conn.handle_timer(2.0)


@settings(max_examples=300, deadline=None)
@given(
    data=STREAMS,
    split=st.integers(0, 64),
    eof=st.booleans(),
    who=st.sampled_from(["fresh server", "fresh client", "open server", "open client"]),
)
def test_connection_fuzz(data: bytes, split: int, eof: bool, who: str) -> None:
    state, side = who.split()
    if state == "fresh":
        conn = Connection(Side.SERVER if side == "server" else Side.CLIENT, now=0.0)
    else:
        pair = ConnectionPair().handshake()
        conn = pair.server if side == "server" else pair.client
    try:
        _pump_connection(conn, data, split, eof)
    except FleetpushError as e:
        # Whatever the bytes, it is the peer's fault: never a local error.
        assert isinstance(e, RemoteProtocolError), repr(e)
