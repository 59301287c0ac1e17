"""Hypothesis stateful fuzzing of a client/server Connection pair (issue 6).

Both sides are driven with arbitrary sequences of *valid* messages in any
order: honest sends through the API (refused with LocalProtocolError when the
state forbids them), forged envelopes and DATA frames written straight onto
the wire (bypassing the sender's state machine), deliveries split at arbitrary
points, answers, misuse of the answering API, time passing and closes.

Invariants:

- sending only ever raises LocalProtocolError, and a refused send leaves the
  connection exactly as it was;
- receiving only ever raises RemoteProtocolError, and only after the sender
  forged something, or the receiver did and the sender answered its forged
  request by itself (an honest pair never trips the receiver);
- while neither side forged and the wire is drained, both sides agree on the
  state and on which requests are outstanding.

Arbitrary bytes into FrameDecoder and Connection are covered at the end.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from fleetpush.protocol import (
    NEED_DATA,
    ChunkReceived,
    Connection,
    ConnectionClosed,
    ConnectionTimeout,
    FleetpushError,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    RequestReceived,
    Side,
    State,
)
from fleetpush.protocol.messages import Empty, Kind
from hostile_proto import (
    ALL_METHODS,
    NOTIFICATION_METHODS,
    PARAMS,
    REQUEST_METHODS,
    RESULTS,
    C,
    S,
    data_frame,
    drive,
    envelope,
    handshaken_pair,
    other,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

sides = st.sampled_from([C, S])


def snapshot(conn: Connection) -> tuple[Any, ...]:
    # Private fields on purpose: "unchanged" must mean the bookkeeping too.
    theirs = {k: (v.method, tuple(v.chunks or ())) for k, v in conn._theirs.items()}
    ours = {k: (v.method, tuple(v.chunks or ())) for k, v in conn._ours.items()}
    return (conn.state, ours, theirs, conn._next_id, bytes(conn._out))


class HonestPair(RuleBasedStateMachine):
    """Both sides use only the API; misuse is refused; the peers always agree."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.conns = {C: Connection(C, now=0.0), S: Connection(S, now=0.0)}
        #: bytes sent by a side that the other has not received yet
        self.wire: dict[Side, bytearray] = {C: bytearray(), S: bytearray()}
        #: the side put bytes on the wire that its state machine did not produce
        self.forged = {C: False, S: False}
        #: the side raised RemoteProtocolError (an adapter would now close it)
        self.dead = {C: False, S: False}
        self.timed_out = False
        #: requests a side received and has not answered: id -> method
        self.incoming: dict[Side, dict[int, str]] = {C: {}, S: {}}
        #: get_chunks requests the server must still stream: id -> [(file, chunk)]
        self.to_stream: dict[int, list[tuple[int, int]]] = {}

    @initialize(handshake=st.booleans())
    def start(self, handshake: bool) -> None:
        # Half the runs start OPEN, so the long tail after the handshake gets
        # as much exploration as the handshake itself.
        if handshake:
            client, server = handshaken_pair()
            self.conns = {C: client, S: server}

    # --- honest API use ----------------------------------------------------------

    @rule(side=sides, method=st.sampled_from(ALL_METHODS))
    def send(self, side: Side, method: str) -> None:
        conn = self.conns[side]
        before = snapshot(conn)
        try:
            if method in RESULTS:
                _, data = conn.send_request(method, PARAMS[method])
            else:
                data = conn.send_notification(method, PARAMS[method])
        except LocalProtocolError:
            assert snapshot(conn) == before, f"refused {method} changed the connection"
            return
        self.wire[side] += data

    @rule(side=sides, pick=st.integers(0, 1000), ok=st.booleans())
    def answer(self, side: Side, pick: int, ok: bool) -> None:
        pending = sorted(self.incoming[side])
        if not pending:
            return
        rid = pending[pick % len(pending)]
        method = self.incoming[side][rid]
        conn = self.conns[side]
        before = snapshot(conn)
        try:
            if ok:
                data = conn.send_response(rid, RESULTS[method])
            else:
                data = conn.send_error(rid, 4, "not found")
        except LocalProtocolError:
            # Legal only where the answer is itself illegal now: a get_chunks
            # with chunks unsent, or anything after a close.
            assert (ok and self.to_stream.get(rid)) or conn.state is State.CLOSED, (
                f"answering {method} {rid} refused in {conn.state}"
            )
            assert snapshot(conn) == before, "a refused answer changed the connection"
            return
        del self.incoming[side][rid]
        self.to_stream.pop(rid, None)
        self.wire[side] += data

    @rule(pick=st.integers(0, 1000), size=st.integers(0, 300))
    def stream_chunk(self, pick: int, size: int) -> None:
        streams = sorted(k for k, v in self.to_stream.items() if v)
        if not streams:
            return
        rid = streams[pick % len(streams)]
        file, chunk = self.to_stream[rid][0]
        conn = self.conns[S]
        before = snapshot(conn)
        try:
            header = conn.send_chunk_header(rid, file, chunk, size)
        except LocalProtocolError:
            assert conn.state is State.CLOSED
            assert snapshot(conn) == before
            return
        self.to_stream[rid].pop(0)
        self.wire[S] += header + bytes([rid % 256]) * size

    @rule(side=sides, rid=st.integers(0, 2**32 - 1), ok=st.booleans())
    def misuse_answer(self, side: Side, rid: int, ok: bool) -> None:
        """Answer a request we never received, or stream chunks nobody asked for."""
        conn = self.conns[side]
        if rid in conn._theirs:
            return
        before = snapshot(conn)
        for call in (
            lambda: conn.send_response(rid, Empty()) if ok else conn.send_error(rid, 1, "x"),
            lambda: conn.send_chunk_header(rid, 0, 0, 10),
            lambda: conn.start_chunks(rid, [(0, 0)]),
        ):
            try:
                call()
            except LocalProtocolError:
                pass
            else:
                raise AssertionError("misuse was accepted")
            assert snapshot(conn) == before

    @rule(side=sides, pick=st.integers(0, 1000))
    def answer_with_wrong_type(self, side: Side, pick: int) -> None:
        """A result of the wrong class is our misuse and must change nothing."""
        conn = self.conns[side]
        pending = sorted(self.incoming[side])
        if not pending:
            return
        event("answer with a result of the wrong type")
        before = snapshot(conn)
        try:
            conn.send_response(pending[pick % len(pending)], object())
        except LocalProtocolError:
            assert snapshot(conn) == before, "a refused answer changed the connection"
        else:
            raise AssertionError("a result of the wrong type was accepted")

    @rule(side=sides)
    def close(self, side: Side) -> None:
        self.wire[side] += self.conns[side].close(1000, "bye")

    @rule(dt=st.floats(0.0, 12.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        for side in (C, S):
            if self.dead[side]:
                continue
            try:
                self.conns[side].handle_timer(self.now)
            except ConnectionTimeout:
                self.dead[side] = True
                self.timed_out = True
            self.wire[side] += self.conns[side].data_to_send()

    # --- delivery ----------------------------------------------------------------

    @precondition(lambda self: any(self.wire.values()))
    @rule(side=sides, n=st.integers(1, 5000))
    def deliver(self, side: Side, n: int) -> None:
        """Move up to n bytes that ``side`` sent to the other side."""
        receiver = other(side)
        chunk = bytes(self.wire[side][:n])
        del self.wire[side][:n]
        if self.dead[receiver] or not chunk:
            return
        conn = self.conns[receiver]
        conn.receive_data(chunk, self.now)
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError:
                event("receiver refused a forgery")
                # The forgery may be the receiver's own: the honest sender's
                # connection answers a forged request by itself (FORBIDDEN to
                # a method the forger's role may not call, a pong), and that
                # answer carries an id the forger's state machine never sent.
                assert self.forged[side] or self.forged[receiver], (
                    "an honest peer tripped the receiver"
                )
                self.dead[receiver] = True
                return
            if ev is NEED_DATA:
                break
            event(f"received {type(ev).__name__}")
            if isinstance(ev, RequestReceived):
                self.incoming[receiver][ev.id] = ev.method
                if ev.method == "get_chunks" and receiver is S:
                    chunks = [tuple(c) for c in ev.params.chunks]
                    conn.start_chunks(ev.id, chunks)
                    self.to_stream[ev.id] = chunks
            elif isinstance(ev, ChunkReceived):
                assert isinstance(ev.payload, memoryview)
            elif isinstance(ev, ConnectionClosed):
                assert conn.state is State.CLOSED
        self.wire[receiver] += conn.data_to_send()

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def states_are_states(self) -> None:
        for conn in self.conns.values():
            assert isinstance(conn.state, State)
            assert conn.outstanding <= conn.max_outstanding

    @invariant()
    def honest_pairs_agree(self) -> None:
        if any(self.forged.values()) or any(self.dead.values()) or any(self.wire.values()):
            return
        c, s = self.conns[C], self.conns[S]
        if State.CLOSED in (c.state, s.state):
            return
        assert c.state == s.state, (c.state, s.state)
        # What each side thinks the other still owes it matches the other's view
        # (the connection's own heartbeat pings are answered automatically).
        assert set(c._ours) == set(s._theirs) | ({c._ping_id} - {None})
        assert set(s._ours) == set(c._theirs) | ({s._ping_id} - {None})


class ForgingPair(HonestPair):
    """As HonestPair, plus valid messages written onto the wire at the wrong moment."""

    @rule(
        side=sides,
        method=st.sampled_from(ALL_METHODS),
        kind=st.sampled_from(list(Kind)),
        rid=st.integers(0, 70),
    )
    def forge_message(self, side: Side, method: str, kind: Kind, rid: int) -> None:
        self.forged[side] = True
        self.wire[side] += envelope(kind, method, rid)

    @rule(
        side=sides,
        stream=st.integers(0, 70),
        file=st.integers(0, 2),
        chunk=st.integers(0, 2),
        size=st.integers(0, 100),
    )
    def forge_data(self, side: Side, stream: int, file: int, chunk: int, size: int) -> None:
        self.forged[side] = True
        self.wire[side] += data_frame(stream, file, chunk, b"z" * size)


_settings = settings(
    max_examples=250,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
HonestPair.TestCase.settings = _settings
ForgingPair.TestCase.settings = _settings
TestHonestPairStateful = HonestPair.TestCase
TestForgingPairStateful = ForgingPair.TestCase


# --- arbitrary bytes -----------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=4000), st.integers(0, 64))
def test_frame_decoder_arbitrary_bytes_only_raise_fleetpush_errors(data: bytes, step: int) -> None:
    dec = FrameDecoder()
    pieces = [data] if step == 0 else [data[i : i + step] for i in range(0, len(data), step)]
    try:
        for piece in [*pieces, b""]:
            dec.feed(piece)
            for _ in range(len(data) + 1):
                if dec.next_frame() is None:
                    break
            else:
                raise AssertionError("next_frame() kept returning frames")
    except FleetpushError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([C, S]), st.booleans(), st.binary(max_size=4000), st.integers(0, 64))
def test_connection_arbitrary_bytes_only_raise_fleetpush_errors(
    side: Side, handshaken: bool, data: bytes, step: int
) -> None:
    if handshaken:
        client, server = handshaken_pair()
        conn = client if side is C else server
    else:
        conn = Connection(side, now=0.0)
    pieces = [data] if step == 0 else [data[i : i + step] for i in range(0, len(data), step)]
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece, 1.0)
            for _ in range(len(data) + 2):
                if conn.next_event() is NEED_DATA:
                    break
            else:
                raise AssertionError("next_event() never returned NEED_DATA")
    except RemoteProtocolError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([0, 1, 2, 3, 4]), st.integers(0, 255), st.data())
def test_valid_frames_mutated_only_raise_fleetpush_errors(mode: int, how: int, data: Any) -> None:
    """Real frames with bytes flipped, dropped and repeated, through every drive() mode."""
    frames = [envelope(Kind.REQUEST, m, 1) for m in REQUEST_METHODS]
    frames += [envelope(Kind.NOTIFICATION, m, 0) for m in NOTIFICATION_METHODS]
    frames += [data_frame(1, 0, 0, b"x" * 40)]
    raw = bytearray(b"".join(data.draw(st.lists(st.sampled_from(frames), min_size=1, max_size=6))))
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    drive(bytes([mode, how]) + bytes(raw))
