"""The sans-IO connection: bytes in, events out, bytes to send (h11 style).

A :class:`Connection` never touches a socket or a clock. Adapters call
``receive_data(data, now)`` with what the socket gave (``b""`` for EOF), then
``next_event()`` until it returns :data:`NEED_DATA`, and send whatever
``send_*`` and ``data_to_send()`` return. Time is passed in; ``get_timer()``
says when ``handle_timer(now)`` must be called next, for heartbeats and the
idle and handshake deadlines (specs/PROTOCOL.md §4, §6).

The connection itself answers ``ping``, refuses unknown methods with
``METHOD_NOT_FOUND`` and methods the peer may not send with ``FORBIDDEN``;
those answers wait in ``data_to_send()``. Who may send what is the one rule
:func:`fleetpush.protocol.handshake.may_send` (§7.9): a server connection
learns the client's role from the ``hello`` it receives and applies it to
every later request and notification; a client connection checks only that
it does not send what a server sends (the releaser is the authority on roles).

The envelope itself (encoding, decoding, shape checks) is envelope.py's;
:class:`EncodedParams` and :func:`encode_params` are re-exported here.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from . import codec
from .buffers import DataPool
from .envelope import (
    MAX_ID,
    EncodedParams,
    check_id,
    check_type,
    decode_envelope,
    encode_envelope,
    encode_params,
    encode_request_frame,
    expect_shape,
    is_pending,
    label,
)
from .errors import (
    CloseCode,
    ConnectionTimeout,
    DecodeError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
)
from .events import (
    NEED_DATA,
    ChunkReceived,
    ConnectionClosed,
    ConnectionEvent,
    ErrorReceived,
    NotificationReceived,
    RequestReceived,
    ResponseReceived,
    _NeedData,
)
from .frames import (
    BodyBudget,
    DataFrame,
    FrameDecoder,
    MessageFrame,
    encode_data_frame_header,
)
from .handshake import may_send
from .limits import (
    DATA_POOL_BYTES,
    DEFAULT_HEARTBEAT,
    IDLE_HEARTBEATS,
    MAX_CHUNK_SIZE,
    MAX_CONTAINERS,
    MAX_MESSAGE_BODY,
    MAX_OUTSTANDING_REQUESTS,
)
from .messages import METHODS, Bye, Empty, Hello, Kind, MethodSpec
from .state import Side, State, transition

#: Before the handshake completes a peer may send only small frames.
HANDSHAKE_MAX_BODY = 64 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@attrs.define
class _Outgoing:
    method: str
    #: for get_chunks: the (file, chunk) pairs still expected, in order.
    chunks: deque[tuple[int, int]] | None = None


class Connection:
    """One end of a fleetpush connection (specs/PROTOCOL.md §4)."""

    def __init__(
        self,
        side: Side,
        *,
        now: float,
        heartbeat: float = DEFAULT_HEARTBEAT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_message_body: int = MAX_MESSAGE_BODY,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        max_outstanding: int = MAX_OUTSTANDING_REQUESTS,
        frame_budget: BodyBudget | None = None,
        max_containers: int = MAX_CONTAINERS,
        data_pool: DataPool | None = None,
        ping_after: float = 1.0,
    ) -> None:
        self.side = side
        self.peer_side = Side.SERVER if side is Side.CLIENT else Side.CLIENT
        self.state = State.AWAIT_HELLO
        self.heartbeat = heartbeat
        # Our own ping goes out after ``ping_after`` heartbeats of silence
        # (§6.2). The releaser waits longer than the heartbeat it announced, so
        # a device pinging on time keeps both ends alive with one exchange per
        # heartbeat instead of two crossing pings (issue 15: idle CPU).
        self._ping_after = ping_after
        self._handshake_deadline = now + handshake_timeout
        self._max_message_body = max_message_body
        self._max_containers = max_containers  # arrays and maps per message (§10)
        # Until the handshake completes every frame body is small, DATA included:
        # an unauthenticated 8-byte header must not make us allocate MiBs (§10).
        # frame_budget: bytes all connections' partial frames may hold together
        # (the releaser's; FrameDecoder), given back by release_buffers().
        # data_pool: reusable DATA body buffers (buffers.py); only the client
        # receives DATA (§6), so it gets one unless told otherwise.
        if data_pool is None and side is Side.CLIENT:
            data_pool = DataPool(DATA_POOL_BYTES)
        self._decoder = FrameDecoder(
            min(max_message_body, HANDSHAKE_MAX_BODY),
            min(max_chunk_size, HANDSHAKE_MAX_BODY),
            frame_budget,
            data_pool,
        )
        self._max_chunk_size = max_chunk_size
        self._max_outstanding = max_outstanding
        self._next_id = 1
        self._ours: dict[int, _Outgoing] = {}  # requests we sent, awaiting answers
        self._theirs: dict[int, _Outgoing] = {}  # requests they sent, awaiting ours
        self._out = bytearray()
        self._last_received = now
        self._ping_id: int | None = None
        self._ping_sent = now  # when the outstanding heartbeat ping went out
        #: the client's role once its hello was received ("device"/"operator").
        self._peer_role: str | None = None
        self._closed_event_sent = False

    # --- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if data:
            self._last_received = now
        self._decoder.feed(data)

    @property
    def data_pool(self) -> DataPool | None:
        """The reusable DATA body buffers of this (client) side, if any."""
        return self._decoder.data_pool

    def receive_hint(self) -> int | None:
        """How many bytes to receive next, or None (see FrameDecoder.receive_hint)."""
        return self._decoder.receive_hint()

    def receive_buffer(self) -> memoryview | None:
        """Room to receive the rest of a large DATA body into directly, or None.

        See :meth:`FrameDecoder.body_buffer`; report what was written with
        :meth:`received_into`. Only an optimisation: ``receive_data`` always works.
        """
        return self._decoder.body_buffer()

    def received_into(self, n: int, now: float) -> None:
        """``n`` (> 0) bytes were written into :meth:`receive_buffer`."""
        self._last_received = now
        self._decoder.body_filled(n)

    def next_event(self) -> ConnectionEvent | _NeedData:
        """Return the next event or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` (or a subclass carrying the close
        code) when the peer broke the protocol; the connection is then dead.
        """
        while True:
            if self.state is State.CLOSED:
                return NEED_DATA
            frame = self._decoder.next_frame()
            if frame is None:
                if self._decoder.at_eof:
                    self.state = State.CLOSED
                    return ConnectionClosed(
                        code=CloseCode.GOING_AWAY, reason="peer closed the connection"
                    )
                return NEED_DATA
            if isinstance(frame, DataFrame):
                return self._on_data(frame)
            event = self._on_message(frame)
            if event is not None:
                return event

    def _on_data(self, frame: DataFrame) -> ChunkReceived:
        self.state = transition(self.state, self.peer_side, "data", self.side)
        out = self._ours.get(frame.stream)
        if out is None or out.chunks is None:
            raise RemoteProtocolError(
                f"DATA frame for stream {frame.stream}, which asked for no chunks"
            )
        if not out.chunks or out.chunks[0] != (frame.file, frame.chunk):
            want = out.chunks[0] if out.chunks else "nothing more"
            raise RemoteProtocolError(
                f"DATA frame for chunk {(frame.file, frame.chunk)} on stream {frame.stream}, "
                f"expected {want}"
            )
        out.chunks.popleft()
        return ChunkReceived(
            stream=frame.stream,
            file=frame.file,
            chunk=frame.chunk,
            payload=frame.payload,
            compressed=frame.compressed,
        )

    def _on_message(self, frame: MessageFrame) -> ConnectionEvent | None:
        kind, raw = decode_envelope(frame.body, self._max_message_body, self._max_containers)
        if kind is Kind.REQUEST:
            return self._on_request(raw)
        if kind is Kind.NOTIFICATION:
            return self._on_notification(raw)
        return self._on_answer(kind, raw)

    def _on_request(self, raw: list[Any]) -> ConnectionEvent | None:
        expect_shape(raw, 4, "request")
        _, rid, method, params = raw
        check_id(rid)
        if not isinstance(method, str):
            raise DecodeError("request method must be a string")
        spec = METHODS.get(method)
        self.state = transition(self.state, self.peer_side, label(method, "req"), self.side)
        if rid in self._theirs:
            raise RemoteProtocolError(f"request id {rid} reused while outstanding")
        if len(self._theirs) >= self._max_outstanding:
            raise RemoteProtocolError(
                f"peer exceeded {self._max_outstanding} outstanding requests", CloseCode.POLICY
            )
        if spec is None or spec.kind is not Kind.REQUEST:
            self._queue_error(rid, ErrorCode.METHOD_NOT_FOUND, f"unknown method {method!r}")
            return None
        if not may_send(spec.sender, self._peer_who()):
            self._queue_error(
                rid, ErrorCode.FORBIDDEN, f"a {self._peer_who()} may not call {method!r}"
            )
            return None
        try:
            typed: object = codec.from_wire(spec.params, params, method)
        except DecodeError as e:
            if self.state is not State.OPEN:
                raise  # a malformed handshake is fatal
            self._queue_error(rid, ErrorCode.INVALID_PARAMS, str(e))
            return None
        if isinstance(typed, Hello):
            self._peer_role = typed.role  # the role rule applies from here on (§7.9)
        if method == "ping":
            self._queue(encode_envelope([Kind.RESPONSE.value, rid, {}]))
            return None
        self._theirs[rid] = _Outgoing(method)
        return RequestReceived(id=rid, method=method, params=typed)

    def _on_notification(self, raw: list[Any]) -> ConnectionEvent | None:
        expect_shape(raw, 3, "notification")
        _, method, params = raw
        if not isinstance(method, str):
            raise DecodeError("notification method must be a string")
        state = transition(
            self.state, self.peer_side, label(method, "req", Kind.NOTIFICATION), self.side
        )
        spec = METHODS.get(method)
        if (
            spec is None
            or spec.kind is not Kind.NOTIFICATION
            or not may_send(spec.sender, self._peer_who())
        ):
            # Notifications have no answer: unknown ones, and ones the peer may
            # not send, are ignored (§3.3).
            self.state = state
            return None
        # Decoded before the state moves: a malformed notification is fatal,
        # and a malformed bye too must still be answered by our bye 1002 (§3.3).
        typed: object = codec.from_wire(spec.params, params, method)
        self.state = state
        if method == "bye":
            assert isinstance(typed, Bye)
            return ConnectionClosed(code=typed.code, reason=typed.reason)
        return NotificationReceived(method=method, params=typed)

    def _on_answer(self, kind: Kind, raw: list[Any]) -> ConnectionEvent | None:
        expect_shape(raw, 3 if kind is Kind.RESPONSE else 5, kind.name.lower())
        rid = raw[1]
        check_id(rid)
        out = self._ours.get(rid)
        if out is None:
            raise RemoteProtocolError(f"{kind.name.lower()} for unknown request id {rid}")
        ok = kind is Kind.RESPONSE
        self.state = transition(
            self.state, self.peer_side, label(out.method, "ok" if ok else "err"), self.side
        )
        del self._ours[rid]
        heartbeat = rid == self._ping_id
        if heartbeat:
            self._ping_id = None
        if out.method == "get_chunks" and ok and out.chunks:
            raise RemoteProtocolError(
                f"get_chunks {rid} answered with {len(out.chunks)} chunks still unsent"
            )
        if ok:
            spec = METHODS[out.method]
            assert spec.result is not None
            result: object = codec.from_wire(spec.result, raw[2], f"{out.method} result")
            if self.state is State.OPEN:
                self._open_limits()
            if heartbeat:
                return None  # our heartbeat's pong only proves liveness (receive_data noted it)
            return ResponseReceived(id=rid, method=out.method, result=result)
        _, _, code, message, data = raw
        if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
            raise DecodeError("error code must be an integer and message a string")
        return ErrorReceived(id=rid, method=out.method, code=code, message=message, data=data)

    # --- sending ---------------------------------------------------------------

    def send_request(self, method: str, params: object) -> tuple[int, bytes]:
        """Encode a request; returns ``(id, bytes)``. The id matches the answer event."""
        spec = self._spec_for_send(method, Kind.REQUEST)
        # Check and encode first: a refused send must leave no phantom request
        # behind (and a wrong params type must not escape as AttributeError).
        check_type(spec.params, params, method)
        if len(self._ours) >= self._max_outstanding:
            raise LocalProtocolError(f"{self._max_outstanding} requests already outstanding")
        state = transition(self.state, self.side, label(method, "req"), self.side)
        rid = self._allocate_id()
        data = encode_envelope([Kind.REQUEST.value, rid, method, codec.to_wire(params)])
        chunks = None
        if method == "get_chunks":
            chunks = deque(tuple(c) for c in params.chunks)  # type: ignore[attr-defined]
        self._ours[rid] = _Outgoing(method, chunks)
        self.state = state
        return rid, data

    def send_request_encoded(self, method: str, params: EncodedParams) -> tuple[int, bytes]:
        """Like :meth:`send_request`, with params from :func:`encode_params`.

        The bytes are the same as ``send_request(method, params)`` would
        produce, and the request is tracked the same way. Not for
        ``get_chunks`` (its chunk list must be tracked).
        """
        spec = self._spec_for_send(method, Kind.REQUEST)
        if method == "get_chunks":
            raise LocalProtocolError("get_chunks cannot be sent with pre-encoded params")
        if not issubclass(params.type, spec.params):
            raise LocalProtocolError(
                f"{method} must be {spec.params.__name__}, got {params.type.__name__}"
            )
        if len(self._ours) >= self._max_outstanding:
            raise LocalProtocolError(f"{self._max_outstanding} requests already outstanding")
        state = transition(self.state, self.side, label(method, "req"), self.side)
        rid = self._next_id  # the id _allocate_id hands out, once the encoding succeeded
        data = encode_request_frame(rid, method, params)
        self._allocate_id()
        self._ours[rid] = _Outgoing(method)
        self.state = state
        return rid, data

    def send_response(self, rid: int, result: object) -> bytes:
        # Check and encode before touching any state: a refused answer must
        # leave the request outstanding so a correct answer can still follow.
        incoming = self._peek_incoming(rid)
        spec = METHODS[incoming.method]
        assert spec.result is not None
        check_type(spec.result, result, f"{incoming.method} result")
        if incoming.chunks:
            raise LocalProtocolError(
                f"get_chunks {rid} answered with {len(incoming.chunks)} chunks unsent"
            )
        state = transition(self.state, self.side, label(incoming.method, "ok"), self.side)
        data = encode_envelope([Kind.RESPONSE.value, rid, codec.to_wire(result)])
        del self._theirs[rid]
        self.state = state
        # A device answered "pending" keeps the pre-handshake limits until an
        # operator accepts it (open_limits): a stranger must not get 8 MiB
        # frames by asking to be enrolled (§10; issue 10, item 3).
        if self.state is State.OPEN and not is_pending(result):
            self._open_limits()
        return data

    def send_error(self, rid: int, code: int, message: str, data: object = None) -> bytes:
        incoming = self._peek_incoming(rid)
        state = transition(self.state, self.side, label(incoming.method, "err"), self.side)
        out = encode_envelope([Kind.ERROR.value, rid, int(code), message, data])
        del self._theirs[rid]
        self.state = state
        return out

    def send_notification(self, method: str, params: object) -> bytes:
        spec = self._spec_for_send(method, Kind.NOTIFICATION)
        check_type(spec.params, params, method)
        self.state = transition(
            self.state, self.side, label(method, "req", Kind.NOTIFICATION), self.side
        )
        return encode_envelope([Kind.NOTIFICATION.value, method, codec.to_wire(params)])

    def start_chunks(self, rid: int, chunks: list[tuple[int, int]]) -> None:
        """Record the chunks that incoming ``get_chunks`` request ``rid`` asked for."""
        incoming = self._theirs.get(rid)
        if incoming is None or incoming.method != "get_chunks":
            raise LocalProtocolError(f"request {rid} is not an open get_chunks")
        incoming.chunks = deque(chunks)

    def send_chunk_header(
        self, rid: int, file: int, chunk: int, length: int, *, compressed: bool = False
    ) -> bytes:
        """Header bytes of the DATA frame answering chunk ``(file, chunk)`` of ``rid``.

        Send the chunk's payload right after it, without concatenating.
        ``compressed``: a DATA_ZSTD frame (§2.3.1), for a peer that announced "zstd".
        """
        incoming = self._theirs.get(rid)
        if incoming is None or not incoming.chunks or incoming.chunks[0] != (file, chunk):
            raise LocalProtocolError(
                f"chunk {(file, chunk)} was not asked for next by request {rid}"
            )
        self.state = transition(self.state, self.side, "data", self.side)
        incoming.chunks.popleft()
        return encode_data_frame_header(rid, file, chunk, length, compressed=compressed)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
        """Encode a ``bye`` and mark the connection closed."""
        if self.state is State.CLOSED:
            return b""
        bye = codec.to_wire(Bye(code=int(code), reason=reason))
        data = encode_envelope([Kind.NOTIFICATION.value, "bye", bye])
        self.state = State.CLOSED
        return data

    def data_to_send(self) -> bytes:
        """Bytes the connection produced itself (pings, pongs, automatic errors)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    # --- time --------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None if never."""
        if self.state is State.CLOSED:
            return None
        if self.state is not State.OPEN:
            return self._handshake_deadline
        if self._ping_id is None and len(self._ours) < self._max_outstanding:
            return self._last_received + self.heartbeat * self._ping_after
        return self._idle_deadline()

    def _idle_deadline(self) -> float:
        deadline = self._last_received + self.heartbeat * IDLE_HEARTBEATS
        if self._ping_id is not None:
            # A silent peer is failed only after our heartbeat ping had
            # (IDLE_HEARTBEATS - 1) heartbeats to be answered: if this timer
            # ran late (an adapter slept on the handshake deadline computed
            # before OPEN), the ping went out late and the deadline moves with
            # it, instead of dropping a peer that was never pinged (§6.2).
            deadline = max(deadline, self._ping_sent + self.heartbeat * (IDLE_HEARTBEATS - 1))
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run deadlines: the handshake deadline, the heartbeat ping, the idle timeout.

        Raises :class:`ConnectionTimeout` when the handshake is late or the
        peer went silent (§6.2).
        """
        if self.state is State.CLOSED:
            return
        if self.state is not State.OPEN:
            if now >= self._handshake_deadline:
                raise ConnectionTimeout("handshake not completed in time")
            return
        due = now >= self._last_received + self.heartbeat * self._ping_after
        if self._ping_id is None and due and len(self._ours) < self._max_outstanding:
            rid, data = self.send_request("ping", Empty())
            self._ping_id, self._ping_sent = rid, now
            self._queue(data)
        if now >= self._idle_deadline():
            raise ConnectionTimeout(f"peer silent for {now - self._last_received:.1f}s")

    # --- helpers -----------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held by the decoder (for frame deadlines)."""
        return self._decoder.buffered

    @property
    def max_outstanding(self) -> int:
        return self._max_outstanding

    @property
    def outstanding(self) -> int:
        """Requests we sent that are not yet answered."""
        return len(self._ours)

    def release_buffers(self) -> None:
        """Give back what a partial frame holds; for the transport when the link ends.

        Nothing is received afterwards. Needed with a ``frame_budget``, which
        garbage collection does not refill.
        """
        self._decoder.release()

    def open_limits(self) -> None:
        """Raise the frame limits to the configured ones (the server: on acceptance).

        They are raised by themselves on OPEN, except on the server for a
        device it answered ``pending`` (§5.3, §10).
        """
        if self.state is State.OPEN:
            self._open_limits()

    def _open_limits(self) -> None:
        self._decoder.max_message_body = self._max_message_body
        # Only the releaser sends DATA frames (§6), so the releaser's decoder
        # keeps refusing any DATA body before buffering it.
        if self.side is Side.CLIENT:
            self._decoder.max_chunk_size = self._max_chunk_size

    def _spec_for_send(self, method: str, kind: Kind) -> MethodSpec:
        spec = METHODS.get(method)
        if spec is None or spec.kind is not kind:
            raise LocalProtocolError(f"{method!r} is not a {kind.name.lower()} method")
        if not may_send(spec.sender, self.side.value):
            raise LocalProtocolError(f"a {self.side.value} may not send {method!r}")
        return spec

    def _peer_who(self) -> str:
        """The peer as the role rule sees it: "server", or the client's role once known."""
        if self.peer_side is Side.SERVER:
            return "server"
        return self._peer_role or "client"

    def _peek_incoming(self, rid: int) -> _Outgoing:
        incoming = self._theirs.get(rid)
        if incoming is None:
            raise LocalProtocolError(f"no outstanding incoming request {rid}")
        return incoming

    def _allocate_id(self) -> int:
        rid = self._next_id
        self._next_id = 1 if rid >= MAX_ID else rid + 1
        while self._next_id in self._ours:
            self._next_id += 1
        return rid

    def _queue_error(self, rid: int, code: ErrorCode, message: str) -> None:
        self._queue(encode_envelope([Kind.ERROR.value, rid, int(code), message, None]))

    def _queue(self, data: bytes) -> None:
        self._out += data


__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "HANDSHAKE_MAX_BODY",
    "Connection",
    "EncodedParams",
    "encode_params",
]
