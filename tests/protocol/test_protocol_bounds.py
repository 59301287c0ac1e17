"""What a peer can cost us by declaring things (issue 10, items 1, 3 and 4).

- Item 1: every integer field of every message is bounded (specs/PROTOCOL.md
  §7.6, §7.9); a request out of range is answered INVALID_PARAMS with a short
  reason, a notification out of range closes the connection with bye 1002.
- Item 3: a frame header declaring 8 MiB makes the decoder hold what arrived,
  not what was declared.
- Item 4: the structure checks of a msgpack body (nesting, container count)
  run Python code per container, never per scalar.
"""

from __future__ import annotations

import sys
import tracemalloc
import types
import typing
from typing import Any

import attrs
import msgpack
import pytest
from fleetpush.protocol import NEED_DATA, FrameDecoder, codec
from fleetpush.protocol import messages as m
from fleetpush.protocol.errors import (
    CloseCode,
    DecodeError,
    ErrorCode,
    FrameError,
    FrameTooLarge,
    RemoteProtocolError,
)
from fleetpush.protocol.events import ErrorReceived
from fleetpush.protocol.frames import HEADER, MAGIC, PROTOCOL_MAJOR, BodyBudget, FrameType
from fleetpush.protocol.limits import (
    MAX_CONTAINERS,
    MAX_MESSAGE_BODY,
    MAX_NESTING,
    MAX_SERVER_CONTAINERS,
    MAX_WIRE_INT,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import ConnectionPair

# --- item 1: integer bounds ----------------------------------------------------------


def _classes() -> list[type]:
    seen: list[type] = []
    todo = [c for spec in m.METHODS.values() for c in (spec.params, spec.result) if c]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            todo += [a for a in _leaves(hint) if isinstance(a, type) and attrs.has(a)]
    return seen


def _leaves(hint: Any) -> list[Any]:
    args = typing.get_args(hint)
    if not args:
        return [hint]
    return [leaf for a in args for leaf in _leaves(a)]


def _bound(validator: Any) -> m.int_range | None:
    validator = getattr(validator, "validator", validator)  # attrs' optional()
    validator = getattr(validator, "value_validator", validator)  # attrs' deep_mapping()
    validator = getattr(validator, "member_validator", validator)  # attrs' deep_iterable()
    return validator if isinstance(validator, m.int_range) else None


INT_FIELDS = [
    (cls, f)
    for cls in _classes()
    for f in attrs.fields(cls)  # type: ignore[arg-type]
    if int in _leaves(typing.get_type_hints(cls)[f.name])
]


def test_every_integer_field_is_bounded_within_sqlite_integer() -> None:
    assert len(INT_FIELDS) >= 15
    for cls, f in INT_FIELDS:
        if (cls, f.name) == (m.GetChunks, "chunks"):
            continue  # u32 pairs, checked by their own validator (§7.8)
        bound = _bound(f.validator)
        assert bound is not None, f"{cls.__name__}.{f.name} has no int_range validator"
        assert -(2**63) <= bound.lo <= bound.hi <= MAX_WIRE_INT


@pytest.mark.parametrize(
    ("cls", "field"), [(c, f.name) for c, f in INT_FIELDS if _bound(f.validator)], ids=str
)
def test_bounds_are_inclusive_and_refused_one_past(cls: type, field: str) -> None:
    f = attrs.fields_dict(cls)[field]  # type: ignore[arg-type]
    bound = _bound(f.validator)
    assert bound is not None
    for ok in (bound.lo, bound.hi):
        bound(None, f, ok)
    for bad in (bound.lo - 1, bound.hi + 1):
        with pytest.raises(ValueError, match=field) as e:
            bound(None, f, bad)
        assert len(str(e.value)) < 120


def test_a_request_out_of_range_is_answered_invalid_params() -> None:
    pair = ConnectionPair().handshake()
    params = m.CheckUpdate(app="demo", version="1.0")
    object.__setattr__(params, "sequence", 2**64 - 1)  # as a peer without our validators
    _rid, events = pair.request(pair.client, "check_update", params)
    assert events == []  # refused by the protocol layer, never seen by the application
    errors = pair.auto_replies(pair.server)
    assert len(errors) == 1 and isinstance(errors[0], ErrorReceived)
    assert errors[0].code == ErrorCode.INVALID_PARAMS
    assert "sequence" in errors[0].message and len(errors[0].message) < 160


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -1], ids=["2**63", "u64 max", "-1"])
def test_a_notification_out_of_range_closes_with_a_short_reason(value: int) -> None:
    pair = ConnectionPair().handshake()
    body = codec.packb([3, "update_progress", {"state": "downloading", "bytes_done": value}])
    with pytest.raises(RemoteProtocolError, match="bytes_done") as e:
        pair.deliver(pair.client, _frame(body))
    assert e.value.close_code == CloseCode.PROTOCOL_ERROR
    assert len(str(e.value)) < 160


def test_the_largest_values_still_round_trip() -> None:
    pair = ConnectionPair().handshake()
    progress = m.UpdateProgress(state="downloading", bytes_done=MAX_WIRE_INT, bytes_total=0)
    events = pair.deliver(pair.client, pair.client.send_notification("update_progress", progress))
    assert [e.params for e in events] == [progress]  # type: ignore[attr-defined]


def test_codec_refuses_any_int_field_past_64_bits() -> None:
    """The net under the validators: even a field without one stays within SQLite's INTEGER."""

    @attrs.frozen(kw_only=True)
    class Unbounded:
        n: int

    assert codec.from_wire(Unbounded, {"n": -(2**63)}).n == -(2**63)
    with pytest.raises(DecodeError, match="64-bit"):
        codec.from_wire(Unbounded, {"n": 2**63})


def _frame(body: bytes) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, len(body)) + body


# --- item 3: memory by declaration ---------------------------------------------------


def test_a_declared_8_mib_body_holds_only_what_arrived() -> None:
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        decoder.feed(HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, MAX_MESSAGE_BODY))
        decoder.feed(b"\x00")
        assert decoder.next_frame() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.allocated <= 128 * 1024
    assert peak < 512 * 1024  # was 8 MiB: bytearray(declared length)
    room = decoder.body_buffer()
    assert room is not None and len(room) < 128 * 1024


def test_a_body_grows_with_what_arrives_and_completes_intact() -> None:
    body = codec.packb({"log": ["x" * 1000] * 8000})
    wire = _frame(body)
    decoder = FrameDecoder()
    pos = 0
    for step in (9, 1000, 60_000, 200_000, 1_000_000, 10_000_000):
        decoder.feed(wire[pos : pos + step])
        pos += step
        frame = decoder.next_frame()
        if frame is not None:
            break
        received = min(pos, len(wire))
        # O(received): never more than 5.3 x what arrived (and a 64 KiB start)
        assert decoder.allocated <= max(6 * received, 128 * 1024)
    assert frame is not None and frame.body == body  # type: ignore[union-attr]
    assert decoder.buffered == 0


def test_receiving_in_place_grows_the_buffer_too() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    decoder = FrameDecoder()
    from fleetpush.protocol.frames import encode_data_frame_header

    decoder.feed(encode_data_frame_header(1, 0, 0, len(payload)) + payload[:10])
    assert decoder.next_frame() is None
    pos = 10
    rooms = []
    while (room := decoder.body_buffer()) is not None:
        rooms.append(len(room))
        n = len(room)
        room[:n] = payload[pos : pos + n]
        del room  # a transport drops its view before the next call
        decoder.body_filled(n)
        pos += n
        frame = decoder.next_frame()
        if frame is not None:
            break
    assert frame is not None and bytes(frame.payload) == payload  # type: ignore[union-attr]
    assert len(rooms) == 3  # 64 KiB, 256 KiB, then the full length: two early copies


@pytest.mark.parametrize("accepted_later", [False, True], ids=["pending", "accepted later"])
def test_a_pending_device_keeps_the_pre_handshake_limits(accepted_later: bool) -> None:
    pair = ConnectionPair().handshake(status="pending")
    if accepted_later:
        pair.server.open_limits()  # what the releaser does when an operator accepts
    big = _frame(
        codec.packb([3, "app_status", {"state": "running", "log_tail": ["x" * 50_000] * 2}])
    )
    if accepted_later:
        assert [e.method for e in pair.deliver(pair.client, big)] == ["app_status"]  # type: ignore[attr-defined]
    else:
        with pytest.raises(FrameTooLarge):
            pair.deliver(pair.client, big[:8])  # refused at the header, nothing buffered


def test_an_accepted_device_gets_the_open_limits_at_once() -> None:
    pair = ConnectionPair().handshake(status="accepted")
    big = _frame(
        codec.packb([3, "app_status", {"state": "running", "log_tail": ["x" * 50_000] * 2}])
    )
    assert len(pair.deliver(pair.client, big)) == 1


def _declaring(n: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_MAJOR, FrameType.MESSAGE, n)


def test_a_shared_budget_bounds_partial_frames_of_all_decoders() -> None:
    budget = BodyBudget(300 * 1024)
    a, b = FrameDecoder(budget=budget), FrameDecoder(budget=budget)
    a.feed(_declaring(MAX_MESSAGE_BODY) + b"\x00" * 100_000)
    assert a.next_frame() is None
    assert budget.used == a.allocated - len(a._buf)  # the body buffer, nothing else
    b.feed(_declaring(MAX_MESSAGE_BODY) + b"\x00" * 250_000)
    with pytest.raises(FrameTooLarge, match="partial frames of all connections"):
        b.next_frame()
    assert budget.used <= budget.limit
    a.release()  # the link ended
    assert budget.used == 0
    with pytest.raises(FrameError):
        a.next_frame()  # a released decoder is dead


def test_completed_and_failed_frames_give_their_budget_back() -> None:
    budget = BodyBudget(MAX_MESSAGE_BODY)
    decoder = FrameDecoder(budget=budget)
    body = codec.packb(["x" * 60_000] * 10)
    wire = _frame(body)
    for i in range(0, len(wire), 70_000):
        decoder.feed(wire[i : i + 70_000])
        frame = decoder.next_frame()
    assert frame is not None and frame.body == body  # type: ignore[union-attr]
    assert budget.used == 0
    decoder.feed(_declaring(200_000) + b"\x00" * 100_000)
    assert decoder.next_frame() is None and budget.used > 0
    decoder.feed(b"")  # end of stream inside the frame
    with pytest.raises(FrameError):
        decoder.next_frame()
    assert budget.used == 0


def test_a_connection_gives_its_budget_back_when_released() -> None:
    budget = BodyBudget(MAX_MESSAGE_BODY)
    pair = ConnectionPair(frame_budget=budget).handshake()
    pair.server.receive_data(_declaring(MAX_MESSAGE_BODY) + b"\x00" * 100_000, 0.0)
    assert pair.server.next_event() is NEED_DATA and budget.used > 0
    pair.server.release_buffers()
    assert budget.used == 0


# --- item 4: structure checks per container ------------------------------------------


def _nil_bomb() -> bytes:
    inner = [None] * 99_000
    return codec.packb([3, "app_status", {"state": "running", "x": [inner] * 84}])


def test_an_8_mib_message_of_nils_runs_python_code_per_container_only() -> None:
    body = _nil_bomb()
    assert len(body) > 8_000_000
    calls = 0

    def profile(_frame: types.FrameType, event: str, _arg: object) -> None:
        nonlocal calls
        if event == "call":  # Python frames only; C calls are "c_call"
            calls += 1

    sys.setprofile(profile)
    try:
        value = codec.unpackb(body)
    finally:
        sys.setprofile(None)
    assert len(value[2]["x"]) == 84
    containers = 1 + 1 + 1 + 84  # envelope, params map, x, inner arrays
    assert calls < 10 * containers  # was ~8.3 M: one per nil


def test_each_container_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    measure = codec._Structure._measure

    def spy(self: codec._Structure, container: object, children: Any) -> None:
        seen.append(container)
        measure(self, container, children)

    monkeypatch.setattr(codec._Structure, "_measure", spy)
    codec.unpackb(_nil_bomb())
    assert len(seen) == 87


def _nested(depth: int, kind: str = "list") -> object:
    value: object = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "map"])
def test_nesting_limit_is_unchanged(kind: str) -> None:
    assert codec.unpackb(codec.packb(_nested(MAX_NESTING, kind))) == _nested(MAX_NESTING, kind)
    with pytest.raises(DecodeError, match="nesting"):
        codec.unpackb(codec.packb(_nested(MAX_NESTING + 1, kind)))


def test_a_deep_branch_after_wide_siblings_is_still_found() -> None:
    # Many finished siblings first, then the deep one: heights are per container.
    wide: list[object] = [[[]] * 50, {"a": [1, 2]}, *([[]] * 100)]
    assert codec.unpackb(codec.packb([*wide, _nested(MAX_NESTING - 1)]))
    with pytest.raises(DecodeError, match="nesting"):
        codec.unpackb(codec.packb([*wide, _nested(MAX_NESTING)]))


def test_container_limit_is_unchanged() -> None:
    half = 100_000 - 1  # arrays hold at most MAX_ARRAY_LEN items

    def body(n: int) -> bytes:
        return codec.packb([[[]] * half, [[]] * (n - 3 - half)])

    codec.unpackb(body(MAX_CONTAINERS))
    with pytest.raises(DecodeError, match="arrays and maps"):
        codec.unpackb(body(MAX_CONTAINERS + 1))


def _status_with(containers: int) -> bytes:
    """A ``status`` request of exactly ``containers`` arrays and maps (most in an extra field)."""
    return codec.packb([0, 1, "status", {"x": [[]] * (containers - 3)}])


def test_the_releaser_budget_refuses_one_container_past_it() -> None:
    """A peer's 60,000 small arrays pinned ~6 MB of the releaser's small-object arenas
    after the live fuzz campaign (issue 10); the releaser's budget is far lower (§10)."""
    codec.unpackb(_status_with(MAX_SERVER_CONTAINERS), max_containers=MAX_SERVER_CONTAINERS)
    with pytest.raises(DecodeError, match=f"more than {MAX_SERVER_CONTAINERS} arrays"):
        codec.unpackb(_status_with(MAX_SERVER_CONTAINERS + 1), max_containers=MAX_SERVER_CONTAINERS)
    codec.unpackb(_status_with(MAX_SERVER_CONTAINERS + 1))  # the default budget is unchanged


def test_the_largest_message_a_releaser_receives_fits_its_container_budget() -> None:
    """``report_outcomes`` of MAX_OUTCOMES full entries (the most containers of any
    device or operator message) is accepted; one container too many closes."""
    pair = ConnectionPair(max_containers=MAX_SERVER_CONTAINERS).handshake()
    outcome = m.Outcome(
        report_id="r" * 64, event="committed", time=1.0, state="committed",
        app="demo", version="1.0.0", push_id="p", error="e" * 200,
    )  # fmt: skip
    params = m.ReportOutcomes(reports=[outcome] * m.MAX_OUTCOMES)
    _rid, events = pair.request(pair.client, "report_outcomes", params)
    assert [e.params for e in events] == [params]  # type: ignore[attr-defined]
    with pytest.raises(DecodeError, match="arrays and maps"):
        pair.deliver(pair.client, _frame(_status_with(MAX_SERVER_CONTAINERS + 1)))


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


TREES = st.recursive(
    st.none() | st.integers(0, 3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3)
    ),
    max_leaves=60,
)


@settings(max_examples=200, deadline=None)
@given(tree=TREES, pad=st.integers(0, 40))
def test_depth_check_agrees_with_a_recursive_walk(tree: object, pad: int) -> None:
    deep = tree
    for _ in range(pad):
        deep = [deep]
    data = codec.packb(deep)
    if _depth(deep) <= MAX_NESTING:
        assert codec.unpackb(data) == deep
    else:
        with pytest.raises(DecodeError, match="nesting"):
            codec.unpackb(data)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x82\xa1a\x01\xa1a\x02", id="duplicate key"),
        pytest.param(b"\x81\xc4\x01a\x01", id="bin key"),
    ],
)
def test_map_key_rules_are_unchanged(body: bytes) -> None:
    with pytest.raises(DecodeError, match="map key"):
        codec.unpackb(body)


def test_msgpack_errors_stay_wrapped() -> None:
    with pytest.raises(DecodeError):
        codec.unpackb(msgpack.packb([1, 2])[:-1])
