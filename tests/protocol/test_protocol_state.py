"""The handshake state machine and the Connection's rules (specs/PROTOCOL.md §4, §6, §7).

The transition table is restated here by hand, from the spec, so a change to
state.py that the spec does not describe fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from fleetpush.protocol import (
    ChunkReceived,
    CloseCode,
    Connection,
    ConnectionClosed,
    DecodeError,
    ErrorCode,
    ErrorReceived,
    FrameTooLarge,
    LocalProtocolError,
    NotificationReceived,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    Side,
    State,
    codec,
)
from fleetpush.protocol import messages as m
from fleetpush.protocol.connection import HANDSHAKE_MAX_BODY
from fleetpush.protocol.frames import encode_data_frame_header, encode_message_frame
from fleetpush.protocol.limits import MAX_CHUNKS_PER_REQUEST, MAX_OUTSTANDING_REQUESTS
from fleetpush.protocol.state import TRANSITIONS, transition
from protocol_helpers import DEVICE_PUB, ConnectionPair, drain

C, S = Side.CLIENT, Side.SERVER
LABELS = ("hello", "hello_ok", "hello_err", "auth", "auth_ok", "auth_err", "bye", "message", "data")

# §6, table 6.1: every legal (state, sender, label) and where it leads.
SPEC_TABLE = {
    (State.AWAIT_HELLO, C, "hello"): State.AWAIT_HELLO_RESULT,
    (State.AWAIT_HELLO_RESULT, S, "hello_ok"): State.AWAIT_AUTH,
    (State.AWAIT_HELLO_RESULT, S, "hello_err"): State.REFUSED,
    (State.AWAIT_AUTH, C, "auth"): State.AWAIT_AUTH_RESULT,
    (State.AWAIT_AUTH_RESULT, S, "auth_ok"): State.OPEN,
    (State.AWAIT_AUTH_RESULT, S, "auth_err"): State.REFUSED,
    (State.OPEN, C, "message"): State.OPEN,
    (State.OPEN, S, "message"): State.OPEN,
    (State.OPEN, S, "data"): State.OPEN,
}
for _state in State:
    if _state is not State.CLOSED:
        SPEC_TABLE[(_state, C, "bye")] = SPEC_TABLE[(_state, S, "bye")] = State.CLOSED

ALL_TRIPLES = list(itertools.product(State, Side, LABELS))


@pytest.mark.parametrize(("state", "sender", "label"), ALL_TRIPLES)
@pytest.mark.parametrize("ours", [C, S])
def test_transition_table(state: State, sender: Side, label: str, ours: Side) -> None:
    key = (state, sender, label)
    if key in SPEC_TABLE:
        assert transition(state, sender, label, ours) is SPEC_TABLE[key]
        return
    # Illegal: our own misuse is a local error, the peer's a remote one (§9.3).
    expected = LocalProtocolError if sender is ours else RemoteProtocolError
    with pytest.raises(expected) as info:
        transition(state, sender, label, ours)
    assert type(info.value) is expected


def test_table_has_nothing_the_spec_does_not() -> None:
    assert TRANSITIONS == SPEC_TABLE


# --- the same rules seen through a Connection --------------------------------------


def _raw(envelope: list[object]) -> bytes:
    return encode_message_frame(codec.packb(envelope))


HELLO = m.Hello(protocol_version="1.0", role="device", peer_id="dev-0001", public_key=DEVICE_PUB)
HELLO_WIRE = codec.to_wire(HELLO)


def _server_after_hello() -> Connection:
    pair = ConnectionPair()
    pair.request(pair.client, "hello", HELLO)
    return pair.server


def _client_after_hello() -> Connection:
    pair = ConnectionPair()
    pair.client.send_request("hello", HELLO)
    return pair.client


# "prose": (make receiver, bytes the peer sends)
REMOTE_VIOLATIONS: dict[str, tuple[Callable[[], Connection], bytes]] = {
    "before handshake: a ping request is refused": (
        lambda: Connection(S, now=0),
        _raw([0, 1, "ping", {}]),
    ),
    "before handshake: an unknown method is refused, not answered": (
        lambda: Connection(S, now=0),
        _raw([0, 1, "frobnicate", {}]),
    ),
    "before handshake: auth before hello": (
        lambda: Connection(S, now=0),
        _raw([0, 1, "auth", {"signature": b"x" * 64}]),
    ),
    "before handshake: a notification other than bye": (
        lambda: Connection(S, now=0),
        _raw([3, "app_status", {"state": "running"}]),
    ),
    "before handshake: a notification named hello does not count as hello": (
        lambda: Connection(S, now=0),
        _raw([3, "hello", HELLO_WIRE]),
    ),
    "before handshake: a request named bye does not close": (
        lambda: Connection(S, now=0),
        _raw([0, 1, "bye", {"code": 1000}]),
    ),
    "before handshake: a DATA frame": (
        lambda: Connection(C, now=0),
        encode_data_frame_header(1, 0, 0, 1) + b"x",
    ),
    "before handshake: a malformed hello is fatal": (
        lambda: Connection(S, now=0),
        _raw([0, 1, "hello", {"role": "device"}]),
    ),
    "before handshake: a hello from the server side": (
        lambda: Connection(C, now=0),
        _raw([0, 1, "hello", HELLO_WIRE]),
    ),
    "handshake: a second hello": (_server_after_hello, _raw([0, 2, "hello", HELLO_WIRE])),
    "handshake: a request while the hello is unanswered": (
        _server_after_hello,
        _raw([0, 2, "ping", {}]),
    ),
    "handshake: the server sends a request before the auth result": (
        _client_after_hello,
        _raw([0, 1, "ping", {}]),
    ),
}


@pytest.mark.parametrize("case", REMOTE_VIOLATIONS)
def test_remote_violation(case: str) -> None:
    make, data = REMOTE_VIOLATIONS[case]
    conn = make()
    conn.receive_data(data, 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert conn.state is not State.OPEN
    assert conn.data_to_send() == b""  # fatal: answered by bye, never by an RPC error


# "prose": (connection factory, action that must raise LocalProtocolError)
LOCAL_MISUSES: dict[str, tuple[Callable[[], Connection], Callable[[Connection], object]]] = {
    "client sends a request before hello": (
        lambda: Connection(C, now=0),
        lambda c: c.send_request("status", m.Empty()),
    ),
    "server sends hello": (lambda: Connection(S, now=0), lambda c: c.send_request("hello", HELLO)),
    "client sends a second hello": (_client_after_hello, lambda c: c.send_request("hello", HELLO)),
    "client sends a server-only method": (
        lambda: ConnectionPair().handshake().client,
        lambda c: c.send_request(
            "__force_update__", m.UpdateCommand(app="a", version="1", restart=False)
        ),
    ),
    "server sends a device-only notification": (
        lambda: ConnectionPair().handshake().server,
        lambda c: c.send_notification("app_status", m.AppStatus(state="running")),
    ),
    "request params of the wrong class": (
        lambda: ConnectionPair().handshake().client,
        lambda c: c.send_request("get_chunks", m.Empty()),
    ),
    "a notification sent as a request": (
        lambda: ConnectionPair().handshake().client,
        lambda c: c.send_request("update_progress", m.UpdateProgress(state="idle")),
    ),
    "responding to a request never received": (
        lambda: ConnectionPair().handshake().server,
        lambda c: c.send_response(42, m.Empty()),
    ),
    "a DATA frame for a chunk not asked for": (
        lambda: ConnectionPair().handshake().server,
        lambda c: c.send_chunk_header(1, 0, 0, 10),
    ),
    "the client sends a DATA frame": (
        lambda: ConnectionPair().handshake().client,
        lambda c: c.start_chunks(1, [(0, 0)]),
    ),
}


@pytest.mark.parametrize("case", LOCAL_MISUSES)
def test_local_misuse(case: str) -> None:
    make, act = LOCAL_MISUSES[case]
    conn = make()
    state_before, outstanding_before = conn.state, conn.outstanding
    with pytest.raises(LocalProtocolError):
        act(conn)
    assert (conn.state, conn.outstanding) == (state_before, outstanding_before)


@pytest.mark.parametrize(
    ("side", "header", "refused"),
    [
        (S, encode_message_frame(bytes(HANDSHAKE_MAX_BODY))[:8], False),
        (S, encode_message_frame(bytes(HANDSHAKE_MAX_BODY + 1))[:8], True),
        (C, encode_data_frame_header(1, 0, 0, HANDSHAKE_MAX_BODY)[:8], False),
        (C, encode_data_frame_header(1, 0, 0, HANDSHAKE_MAX_BODY + 1)[:8], True),
    ],
    ids=["message at 64 KiB", "message over 64 KiB", "data at 64 KiB", "data over 64 KiB"],
)
def test_pre_handshake_limit_is_checked_on_the_header(
    side: Side, header: bytes, refused: bool
) -> None:
    # Before OPEN, a body over 64 KiB (DATA: a payload) is refused from its
    # 8-byte header alone, before any body byte is buffered (§10).
    conn = Connection(side, now=0)
    conn.receive_data(header, 0)
    if refused:
        with pytest.raises(FrameTooLarge):
            drain(conn)
    else:
        assert drain(conn) == []


def test_open_lifts_the_pre_handshake_limit(pair: ConnectionPair) -> None:
    big = m.AppStatus(state="running", log_tail=["x" * 60_000, "y" * 60_000])
    pair.handshake()
    events = pair.deliver(pair.client, pair.client.send_notification("app_status", big))
    assert events == [NotificationReceived(method="app_status", params=big)]
    rid = _chunks_request(pair, [(0, 0)])
    payload = bytes(HANDSHAKE_MAX_BODY * 4)
    [chunk] = pair.deliver(
        pair.server, pair.server.send_chunk_header(rid, 0, 0, len(payload)) + payload
    )
    assert isinstance(chunk, ChunkReceived) and len(chunk.payload) == len(payload)


def test_pending_and_rejected_enrollment_are_results_the_client_sees() -> None:
    pair = ConnectionPair()
    pair.hello()
    rid, _ = pair.request(pair.client, "auth", m.Auth(signature=b"s" * 64))
    assert pair.respond(pair.server, rid, m.AuthResult(status="pending")) == [
        ResponseReceived(id=rid, method="auth", result=m.AuthResult(status="pending"))
    ]
    assert pair.client.state is State.OPEN


def test_auth_error_then_bye_closes_both_ends() -> None:
    # §5.2: a refused auth is answered by the error, then bye 1011; the client
    # sees both (issue 9, item 1).
    pair = ConnectionPair()
    pair.hello()
    rid, _ = pair.request(pair.client, "auth", m.Auth(signature=b"s" * 64))
    events = pair.deliver(
        pair.server, pair.server.send_error(rid, ErrorCode.AUTH_FAILED, "bad signature")
    )
    assert events == [
        ErrorReceived(id=rid, method="auth", code=ErrorCode.AUTH_FAILED, message="bad signature")
    ]
    assert pair.client.state is State.REFUSED and pair.server.state is State.REFUSED
    events = pair.deliver(pair.server, pair.server.close(CloseCode.AUTH_FAILED, "bad signature"))
    assert events == [ConnectionClosed(code=CloseCode.AUTH_FAILED, reason="bad signature")]
    assert pair.client.state is State.CLOSED and pair.server.state is State.CLOSED


def test_hello_error_then_bye_naming_the_version() -> None:
    pair = ConnectionPair()
    rid, _ = pair.request(pair.client, "hello", HELLO)
    text = "protocol 2.0 is not supported; this releaser speaks 1.0"
    events = pair.deliver(
        pair.server, pair.server.send_error(rid, ErrorCode.VERSION_MISMATCH, text)
    )
    assert events == [
        ErrorReceived(id=rid, method="hello", code=ErrorCode.VERSION_MISMATCH, message=text)
    ]
    assert pair.client.state is State.REFUSED
    events = pair.deliver(pair.server, pair.server.close(CloseCode.VERSION_MISMATCH, text))
    assert events == [ConnectionClosed(code=CloseCode.VERSION_MISMATCH, reason=text)]
    assert pair.client.state is State.CLOSED


def test_refused_admits_nothing_but_bye() -> None:
    pair = ConnectionPair()
    rid, _ = pair.request(pair.client, "hello", HELLO)
    pair.deliver(pair.server, pair.server.send_error(rid, ErrorCode.VERSION_MISMATCH, "no"))
    with pytest.raises(LocalProtocolError):
        pair.server.send_request(
            "__force_update__", m.UpdateCommand(app="a", version="1", restart=True)
        )
    with pytest.raises(LocalProtocolError):
        pair.client.send_request("auth", m.Auth(signature=b"s" * 64))
    pair.client.receive_data(_raw([0, 1, "ping", {}]), 0.0)
    with pytest.raises(RemoteProtocolError):
        drain(pair.client)


def test_frame_of_another_major_version_names_both(pair: ConnectionPair) -> None:
    frame = bytearray(pair.client.send_request("hello", HELLO)[1])
    frame[2] = 2
    pair.server.receive_data(bytes(frame), 0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(pair.server)
    assert info.value.close_code is CloseCode.VERSION_MISMATCH
    assert "2." in str(info.value) and "1.1" in str(info.value)


# --- OPEN-state rules ----------------------------------------------------------------


def test_unknown_request_method_not_found_reaches_the_caller(open_pair: ConnectionPair) -> None:
    rid, data = open_pair.client.send_request("status", m.Empty())
    renamed = codec.unpackb(data[8:])
    renamed[2] = "frobnicate"
    open_pair.server.receive_data(_raw(renamed), 0)
    assert drain(open_pair.server) == []
    [event] = open_pair.auto_replies(open_pair.server)
    assert isinstance(event, ErrorReceived)
    assert (event.id, event.code) == (rid, ErrorCode.METHOD_NOT_FOUND)


def test_forbidden_method_is_answered_forbidden(open_pair: ConnectionPair) -> None:
    params = codec.to_wire(m.UpdateCommand(app="a", version="1.0", restart=True))
    open_pair.server.receive_data(_raw([0, 9, "__force_update__", params]), 0)
    assert drain(open_pair.server) == []
    reply = codec.unpackb(open_pair.server.data_to_send()[8:])
    assert reply[:3] == [2, 9, ErrorCode.FORBIDDEN]


def test_invalid_params_are_answered_not_fatal_when_open(open_pair: ConnectionPair) -> None:
    open_pair.server.receive_data(_raw([0, 3, "check_update", {"app": 7, "version": "1.0"}]), 0)
    assert drain(open_pair.server) == []
    reply = codec.unpackb(open_pair.server.data_to_send()[8:])
    assert reply[:3] == [2, 3, ErrorCode.INVALID_PARAMS]
    assert "app" in reply[3]
    assert open_pair.server.state is State.OPEN


def test_unknown_fields_and_notifications_are_ignored(open_pair: ConnectionPair) -> None:
    # §3.3: unknown keys in params are dropped; unknown notifications too.
    open_pair.server.receive_data(_raw([3, "from_the_future", {"a": 1}]), 0)
    open_pair.server.receive_data(
        _raw([0, 4, "check_update", {"app": "a", "version": "1.0", "new": [1]}]), 0
    )
    assert drain(open_pair.server) == [
        RequestReceived(id=4, method="check_update", params=m.CheckUpdate(app="a", version="1.0"))
    ]
    assert open_pair.server.data_to_send() == b""


def test_forbidden_notification_is_dropped(open_pair: ConnectionPair) -> None:
    event = codec.to_wire(m.Event(seq=1, time=0.0, kind="x"))
    open_pair.server.receive_data(_raw([3, "event", event]), 0)  # "event" is server -> operator
    assert drain(open_pair.server) == []


def test_request_id_reuse_while_outstanding(open_pair: ConnectionPair) -> None:
    open_pair.server.receive_data(_raw([0, 8, "status", {}]) * 2, 0)
    with pytest.raises(RemoteProtocolError, match="reused"):
        drain(open_pair.server)


def test_ids_are_per_direction(open_pair: ConnectionPair) -> None:
    # Both sides may use id 1 at the same time; answers are matched per direction.
    c_rid, c_events = open_pair.request(open_pair.client, "status", m.Empty())
    s_rid, s_events = open_pair.request(
        open_pair.server, "__apply_update__", m.UpdateCommand(app="a", version="1.0", restart=False)
    )
    assert c_events[0].id == c_rid  # type: ignore[union-attr]
    assert s_events[0].id == s_rid  # type: ignore[union-attr]
    ack = m.Ack(accepted=True)
    assert open_pair.respond(open_pair.client, s_rid, ack) == [
        ResponseReceived(id=s_rid, method="__apply_update__", result=ack)
    ]


def test_outstanding_request_limit(open_pair: ConnectionPair) -> None:
    for _ in range(MAX_OUTSTANDING_REQUESTS):
        open_pair.client.send_request("status", m.Empty())
    with pytest.raises(LocalProtocolError):
        open_pair.client.send_request("status", m.Empty())
    flood = b"".join(_raw([0, i, "status", {}]) for i in range(MAX_OUTSTANDING_REQUESTS + 1))
    open_pair.server.receive_data(flood, 0)
    with pytest.raises(RemoteProtocolError) as info:
        drain(open_pair.server)
    assert info.value.close_code is CloseCode.POLICY


def test_bye_closes_and_nothing_follows(open_pair: ConnectionPair) -> None:
    events = open_pair.deliver(open_pair.client, open_pair.client.close(CloseCode.NORMAL, "done"))
    assert events == [ConnectionClosed(code=CloseCode.NORMAL, reason="done")]
    assert open_pair.client.state is State.CLOSED and open_pair.server.state is State.CLOSED
    assert open_pair.client.close() == b""
    with pytest.raises(LocalProtocolError):
        open_pair.client.send_request("status", m.Empty())


def test_eof_between_frames_is_a_clean_close(open_pair: ConnectionPair) -> None:
    open_pair.server.receive_data(b"", 0)
    assert drain(open_pair.server) == [
        ConnectionClosed(code=CloseCode.GOING_AWAY, reason="peer closed the connection")
    ]


# --- get_chunks flow (§7.8) -------------------------------------------------------------


def _chunks_request(pair: ConnectionPair, chunks: list[tuple[int, int]]) -> int:
    rid, events = pair.request(
        pair.client, "get_chunks", m.GetChunks(app="a", version="1.0", chunks=chunks)
    )
    assert len(events) == 1
    pair.server.start_chunks(rid, chunks)
    return rid


def test_chunks_flow_in_order_then_response(open_pair: ConnectionPair) -> None:
    rid = _chunks_request(open_pair, [(0, 1), (2, 0)])
    got = []
    for file, chunk in [(0, 1), (2, 0)]:
        got += open_pair.deliver(
            open_pair.server, open_pair.server.send_chunk_header(rid, file, chunk, 3) + b"abc"
        )
    assert [(e.file, e.chunk) for e in got if isinstance(e, ChunkReceived)] == [(0, 1), (2, 0)]
    assert open_pair.respond(open_pair.server, rid, m.GetChunksResult(sent=2)) == [
        ResponseReceived(id=rid, method="get_chunks", result=m.GetChunksResult(sent=2))
    ]


def test_chunks_out_of_order_are_refused(open_pair: ConnectionPair) -> None:
    rid = _chunks_request(open_pair, [(0, 0), (0, 1)])
    with pytest.raises(LocalProtocolError):
        open_pair.server.send_chunk_header(rid, 0, 1, 3)
    open_pair.client.receive_data(encode_data_frame_header(rid, 0, 1, 3) + b"abc", 0)
    with pytest.raises(RemoteProtocolError, match="expected"):
        drain(open_pair.client)


def test_chunks_on_a_stream_that_asked_for_none(open_pair: ConnectionPair) -> None:
    rid, _ = open_pair.request(open_pair.client, "status", m.Empty())
    open_pair.client.receive_data(encode_data_frame_header(rid, 0, 0, 1) + b"x", 0)
    with pytest.raises(RemoteProtocolError, match="asked for no chunks"):
        drain(open_pair.client)


def test_extra_chunk_after_the_last_is_refused(open_pair: ConnectionPair) -> None:
    rid = _chunks_request(open_pair, [(0, 0)])
    open_pair.deliver(open_pair.server, open_pair.server.send_chunk_header(rid, 0, 0, 1) + b"x")
    open_pair.client.receive_data(encode_data_frame_header(rid, 0, 1, 1) + b"y", 0)
    with pytest.raises(RemoteProtocolError, match="nothing more"):
        drain(open_pair.client)


def test_response_before_all_chunks_is_refused(open_pair: ConnectionPair) -> None:
    rid = _chunks_request(open_pair, [(0, 0), (0, 1)])
    with pytest.raises(LocalProtocolError):
        open_pair.server.send_response(rid, m.GetChunksResult(sent=0))
    open_pair.client.receive_data(_raw([1, rid, {"sent": 0}]), 0)
    with pytest.raises(RemoteProtocolError, match="unsent"):
        drain(open_pair.client)


def test_error_may_end_a_chunk_stream_early(open_pair: ConnectionPair) -> None:
    rid = _chunks_request(open_pair, [(0, 0), (0, 1)])
    open_pair.deliver(open_pair.server, open_pair.server.send_chunk_header(rid, 0, 0, 1) + b"x")
    events = open_pair.deliver(
        open_pair.server, open_pair.server.send_error(rid, ErrorCode.NOT_FOUND, "gone")
    )
    assert [type(e) for e in events] == [ErrorReceived]


def test_chunk_request_size_is_bounded(open_pair: ConnectionPair) -> None:
    with pytest.raises(ValueError, match="Length of 'chunks'"):
        m.GetChunks(
            app="a", version="1.0", chunks=[(0, i) for i in range(MAX_CHUNKS_PER_REQUEST + 1)]
        )
    too_many = [[0, i] for i in range(MAX_CHUNKS_PER_REQUEST + 1)]
    open_pair.server.receive_data(
        _raw([0, 3, "get_chunks", {"app": "a", "version": "1.0", "chunks": too_many}]), 0
    )
    assert drain(open_pair.server) == []
    assert codec.unpackb(open_pair.server.data_to_send()[8:])[:3] == [
        2,
        3,
        ErrorCode.INVALID_PARAMS,
    ]


def test_chunk_indices_must_fit_u32(open_pair: ConnectionPair) -> None:
    with pytest.raises(ValueError, match="u32"):
        m.GetChunks(app="a", version="1.0", chunks=[(0, -1)])
    params = {"app": "a", "version": "1.0", "chunks": [[2**32, 0]]}
    open_pair.server.receive_data(_raw([0, 3, "get_chunks", params]), 0)
    assert drain(open_pair.server) == []
    assert codec.unpackb(open_pair.server.data_to_send()[8:])[:3] == [
        2,
        3,
        ErrorCode.INVALID_PARAMS,
    ]


def test_malformed_notification_is_fatal(open_pair: ConnectionPair) -> None:
    open_pair.server.receive_data(_raw([3, "app_status", {"state": "dancing"}]), 0)
    with pytest.raises(DecodeError):
        drain(open_pair.server)


def test_releaser_refuses_data_frames_from_its_header_alone(pair: ConnectionPair) -> None:
    # Only the releaser sends DATA (§6): after the handshake the releaser's
    # decoder still refuses a DATA frame from its 8-byte header, so an
    # authenticated device cannot make it buffer a 4 MiB body first (§10).
    pair.handshake()
    header = encode_data_frame_header(1, 0, 0, 1024 * 1024)[:8]
    pair.server.receive_data(header, 0)
    with pytest.raises(FrameTooLarge):
        drain(pair.server)


# --- issue 9: the spec and the server agree ---------------------------------------------


def test_bye_without_its_code_is_answered_by_bye_1002(open_pair: ConnectionPair) -> None:
    # §3.3 (4) and the vector "bye without its code": a malformed bye is a
    # malformed notification. The receiver must still be able to send its own
    # bye 1002, so the bad bye must not have moved it to CLOSED (item 3).
    server = open_pair.server
    server.receive_data(_raw([3, "bye", {"reason": "x"}]), 0)
    with pytest.raises(DecodeError) as info:
        drain(server)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert server.state is State.OPEN
    bye = server.close(info.value.close_code, str(info.value))
    assert codec.unpackb(bye[8:])[:2] == [3, "bye"]
    assert codec.unpackb(bye[8:])[2]["code"] == 1002


#: prose -> (make receiver, bytes the peer sends, where the reason points)
SHORT_REASONS: dict[str, tuple[Callable[[], Connection], bytes, str]] = {
    "hello with role admin": (
        lambda: Connection(S, now=0),
        _raw([0, 1, "hello", {**HELLO_WIRE, "role": "admin"}]),
        "hello: role must be one of device, operator, got 'admin'",
    ),
    "update_progress with an unknown state": (
        lambda: ConnectionPair().handshake().server,
        _raw([3, "update_progress", {"state": "dancing"}]),
        "update_progress: state must be one of the 21 listed in specs/PROTOCOL.md §7.6, "
        "got 'dancing'",
    ),
    "a long bad value is quoted short": (
        lambda: ConnectionPair().handshake().server,
        _raw([3, "app_status", {"state": "x" * 1000}]),
        "app_status: state must be one of starting, running, stopping, stopped, error, "
        f"got '{'x' * 39}...",
    ),
}


@pytest.mark.parametrize("case", SHORT_REASONS)
def test_invalid_field_reasons_are_short_sentences(case: str) -> None:
    # Issue 9, item 5: the bye reason used to be the repr of attrs' ValueError
    # arguments (~400 characters, an Attribute object included).
    make, data, reason = SHORT_REASONS[case]
    conn = make()
    conn.receive_data(data, 0)
    with pytest.raises(DecodeError) as info:
        drain(conn)
    assert str(info.value) == reason
    assert "Attribute(" not in str(info.value)


def _pair_as(role: str) -> ConnectionPair:
    return ConnectionPair().handshake(role=role)


#: prose -> (client role, method, params): requests the releaser's Connection refuses
ROLE_FORBIDDEN: dict[str, tuple[str, str, object]] = {
    "a device may not list devices": ("device", "list_devices", m.DeviceFilter()),
    "a device may not push": (
        "device",
        "push",
        m.Push(app="a", version="1.0", mode="force", all=True),
    ),
    "an operator may not check for updates": (
        "operator",
        "check_update",
        m.CheckUpdate(app="a", version="1.0"),
    ),
    "an operator may not fetch chunks": (
        "operator",
        "get_chunks",
        m.GetChunks(app="a", version="1.0", chunks=[(0, 0)]),
    ),
}


@pytest.mark.parametrize("case", ROLE_FORBIDDEN)
def test_the_role_rule_is_applied_by_the_releasers_connection(case: str) -> None:
    # §7.9: the role from the hello is applied by the sans-IO core, in one
    # place (protocol/handshake.py may_send), not restated by the releaser.
    role, method, params = ROLE_FORBIDDEN[case]
    pair = _pair_as(role)
    rid, events = pair.request(pair.client, method, params)
    assert events == []
    [answer] = pair.auto_replies(pair.server)
    assert isinstance(answer, ErrorReceived)
    assert (answer.id, answer.code) == (rid, ErrorCode.FORBIDDEN)
    assert answer.message == f"a {role} may not call {method!r}"


def test_status_and_ping_are_open_to_both_roles() -> None:
    for role in ("device", "operator"):
        pair = _pair_as(role)
        rid, events = pair.request(pair.client, "status", m.Empty())
        assert events == [RequestReceived(id=rid, method="status", params=m.Empty())]


def test_a_device_notification_from_an_operator_is_dropped() -> None:
    pair = _pair_as("operator")
    events = pair.deliver(
        pair.client, pair.client.send_notification("app_status", m.AppStatus(state="running"))
    )
    assert events == []
    assert pair.server.state is State.OPEN
