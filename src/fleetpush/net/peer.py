"""The trio adapter both ends share: a :class:`Connection` driven over a stream.

One reader task per connection feeds bytes to the sans-IO core and routes the
events; one lock serialises writes; every network wait has a deadline
(specs/PROTOCOL.md §6):

- ``frame_timeout``: once a frame has started arriving it must complete within
  this time, so a peer dripping one byte a second is dropped;
- ``send_timeout``: every write must finish within this time, so a peer that
  stops reading is dropped instead of holding our buffers;
- the Connection's own timers: handshake deadline, heartbeat ping, idle timeout.

Incoming requests run in their own tasks (at most ``MAX_OUTSTANDING_REQUESTS``,
which the core enforces), except methods listed in ``ordered``, which one task
serves strictly in arrival order (``get_chunks``: DATA frames of one
connection are sent stream after stream). Chunk streams we asked for are
delivered through bounded channels, so a slow consumer slows the socket, not
memory.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import trio

from fleetpush.protocol import (
    NEED_DATA,
    ChunkReceived,
    CloseCode,
    Connection,
    ConnectionClosed,
    ErrorCode,
    ErrorReceived,
    FleetpushError,
    LocalProtocolError,
    NotificationReceived,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    RpcError,
    State,
)
from fleetpush.protocol.connection import EncodedParams

from .answers import AnswerCallback, PendingAnswers
from .chunk_stream import ChunkStream
from .handshake import client_handshake

# ChunkStream and client_handshake moved to their own modules; still exported here.
__all__ = ["ChunkStream", "Peer", "PeerClosed", "TransportError", "client_handshake", "open_peer"]

log = logging.getLogger("fleetpush.net.peer")

#: Below glibc's mmap threshold (128 KiB): a larger recv buffer is mmapped and
#: unmapped on every receive, ~11 us each (measured: recv of 20 bytes, 12.8 us
#: with 256 KiB, 1.1 us with 64 KiB), paid per heartbeat and per push ack on
#: every link (issue 15).
RECEIVE_SIZE = 64 * 1024
#: While chunk streams we asked for are open: small content-defined chunks
#: then arrive several per receive, decoded and handed on together, one
#: receive call and one consumer wake-up for all of them (issue 14:
#: 3.79 -> 3.42 device CPU s/GiB). Only then: an idle releaser connection
#: keeps receiving small messages with the smaller size.
RECEIVE_SIZE_CHUNKS = 1024 * 1024
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_FRAME_TIMEOUT = 30.0
DEFAULT_REQUEST_TIMEOUT = 30.0
RequestHandler = Callable[["Peer", RequestReceived], Awaitable[None]]
NotificationHandler = Callable[["Peer", NotificationReceived], Awaitable[None]]


class TransportError(FleetpushError):
    """The connection to the peer failed or was closed."""


class PeerClosed(TransportError):
    """The connection is closed; ``code`` and ``reason`` say why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


@attrs.define
class _Pending:
    event: trio.Event = attrs.field(factory=trio.Event)
    outcome: ResponseReceived | ErrorReceived | None = None


class Peer:
    """A live connection. Create with :func:`open_peer`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: Connection,
        *,
        name: str,
        on_request: RequestHandler | None,
        on_notification: NotificationHandler | None,
        ordered: frozenset[str],
        send_timeout: float,
        frame_timeout: float,
    ) -> None:
        self.stream = stream
        # Chunk bodies are received straight into their buffer on a plain
        # socket (Connection.receive_buffer); TLS streams take the copy.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.conn = conn
        self.name = name
        self._on_request = on_request
        self._on_notification = on_notification
        self._ordered = ordered
        self._send_timeout = send_timeout
        self._frame_timeout = frame_timeout
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        #: requests sent by request_nowait, answered by callback (answers.py)
        self._answers = PendingAnswers(name)
        #: the unsent tail of a frame request_nowait wrote in part (_send_locked)
        self._backlog: tuple[bytes | bytearray | memoryview, ...] = ()
        self._streams: dict[int, ChunkStream] = {}
        # Ordered requests go through a channel to one worker task, both made
        # by the first ordered request, not with the connection: an idle
        # device link then holds one task (the reader) and no channel (issue 15).
        # The core refuses more than max_outstanding unanswered requests, so
        # send_nowait into this channel never finds it full.
        self._ordered_send: trio.MemorySendChannel[RequestReceived] | None = None
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.bytes_received = 0
        self.bytes_sent = 0
        self._nursery: trio.Nursery | None = None
        self._closing = False
        #: the reader's current wait, so a send that moves the core's timer
        #: earlier can wake it (see _rearm_timer).
        self._wait_scope: trio.CancelScope | None = None

    # --- sending -------------------------------------------------------------------

    def _check_open(self) -> None:
        """Raise :class:`PeerClosed` once the connection is gone.

        Checked before the core encodes anything: a closed Connection would
        otherwise answer our misuse with LocalProtocolError, but a link that
        dropped under us is the peer's doing, not a bug of ours.
        """
        if self.closed.is_set() or self.conn.state is State.CLOSED:
            raise PeerClosed(self.close_code or CloseCode.GOING_AWAY, self.close_reason or "closed")

    async def _send(
        self, *parts: bytes | bytearray | memoryview, schedule_point: bool = True
    ) -> None:
        """Write ``parts`` as one uninterrupted run of bytes (frames never interleave).

        When no other task is writing, the bytes are written at once, before
        this task yields: a push to 1000 devices puts each command on the wire
        as its delivery task runs instead of queueing 1000 tasks on the lock.
        Only what the socket does not take at once is awaited, under the send
        deadline. Like any trio call this is a checkpoint: a cancelled caller
        sends nothing, and it yields after writing unless ``schedule_point`` is
        False (for callers that wait right after, like :meth:`request`).
        """
        if self.closed.is_set():
            raise PeerClosed(self.close_code or CloseCode.NORMAL, self.close_reason)
        lock = self._send_lock
        if lock.locked() or self._backlog:
            async with lock:
                await self._send_locked(parts)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        lock.acquire_nowait()  # free, and nothing yielded since we looked
        try:
            rest = self._write_nowait(parts)
            if rest:
                await self._send_locked(rest)
            elif schedule_point:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            lock.release()

    def _write_nowait(
        self, parts: tuple[bytes | bytearray | memoryview, ...]
    ) -> tuple[bytes | bytearray | memoryview, ...]:
        """Write what the socket takes without blocking; returns what is left.

        Only on a plain socket (TLS streams need their own send path), and only
        with the send lock held. All parts go in one ``writev``: a DATA frame's
        header and its payload leave in one system call, and the payload (a
        chunk buffer) is never copied into a joined frame.
        """
        if self._socket is None:
            return parts
        live = [part for part in parts if part]
        if not live:
            return ()
        try:
            n = os.writev(self._socket.fileno(), live)
        except BlockingIOError:
            return tuple(live)
        except OSError as e:  # reset, broken pipe, or closed under us (fd -1)
            self._mark_closed(CloseCode.GOING_AWAY, f"send failed: {e}")
            raise PeerClosed(CloseCode.GOING_AWAY, str(e)) from e
        self.bytes_sent += n
        for i, part in enumerate(live):
            if n < len(part):
                return (memoryview(part)[n:], *live[i + 1 :])
            n -= len(part)
        return ()

    async def _send_locked(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        if self._backlog:  # a frame request_nowait began goes out first, whole
            parts, self._backlog = (*self._backlog, *parts), ()
        try:
            with trio.fail_after(self._send_timeout):
                if self._socket is not None:
                    # Write, then wait until the socket is writable again. Not
                    # send_all: it retries a partial send at once, and a peer
                    # reading as fast as we write then frees a few KiB at a time,
                    # one scheduler round per send (8000 per GiB served, issue 14
                    # item 3). Writability waits for a third of the send buffer.
                    while parts:
                        await trio.lowlevel.wait_writable(self._socket)
                        parts = self._write_nowait(parts)
                else:
                    for part in parts:
                        if part:
                            await self.stream.send_all(part)
                            self.bytes_sent += len(part)
        except trio.TooSlowError:
            self._mark_closed(CloseCode.TIMEOUT, "peer stopped reading (send deadline passed)")
            await self._abort()
            raise PeerClosed(CloseCode.TIMEOUT, "send deadline passed") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._mark_closed(CloseCode.GOING_AWAY, f"send failed: {e}")
            raise PeerClosed(CloseCode.GOING_AWAY, str(e)) from e

    async def _flush_auto(self) -> None:
        data = self.conn.data_to_send()
        if data:
            # No schedule point after a pong: the reader's next receive is one
            # (one scheduler round per heartbeat exchange instead of two).
            await self._send(data, schedule_point=False)

    async def request(
        self,
        method: str,
        params: object,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> Any:
        """Send a request and wait for its result.

        ``params`` may be an :class:`EncodedParams` (see :func:`encode_params`)
        to send the same params to many peers while encoding them once.

        Raises :class:`RpcError` if the peer answered with an error,
        :class:`PeerClosed` if the connection ends first, ``trio.TooSlowError``
        after ``timeout``.
        """
        self._check_open()
        if isinstance(params, EncodedParams):
            rid, data = self.conn.send_request_encoded(method, params)
        else:
            rid, data = self.conn.send_request(method, params)
        pending = _Pending()
        self._pending[rid] = pending
        try:
            # no schedule point after the write: waiting for the answer is one
            await self._send(data, schedule_point=False)
            # A bare CancelScope, not fail_after(): this runs once per device of a push.
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                await pending.event.wait()  # also set when the connection closes
            if scope.cancelled_caught:
                raise trio.TooSlowError
        finally:
            self._pending.pop(rid, None)
        return _outcome(pending, self)

    def request_nowait(
        self, method: str, params: EncodedParams, on_answer: AnswerCallback, *, timeout: float
    ) -> bool:
        """Send a request now, with no task or yield, if no task is writing (push fan-out).

        False (nothing sent) on TLS or while the send lock is held: the caller
        then uses :meth:`request`, so frames keep their order. A frame written
        in part is finished first. On True, ``on_answer`` gets one outcome (answers.py).
        """
        conn = self.conn
        if (
            self._socket is None
            or self._send_lock.locked()
            or self._backlog
            or self.closed.is_set()
            or conn.state is not State.OPEN
            or conn.outstanding >= conn.max_outstanding
        ):
            return False
        rid, data = conn.send_request_encoded(method, params)
        self._answers.add(rid, trio.current_time() + timeout, on_answer)
        scope = self._wait_scope  # the reader must wake for the ack's deadline
        if scope is not None and self._answers.deadline < scope.deadline:
            scope.deadline = self._answers.deadline
        try:
            rest = self._write_nowait((data,))
        except PeerClosed:
            return True  # _mark_closed answered on_answer
        if rest:
            self._backlog = rest
            assert self._nursery is not None
            self._nursery.start_soon(self._flush_backlog)
        return True

    async def _flush_backlog(self) -> None:
        with suppress(PeerClosed):
            async with self._send_lock:
                await self._send_locked(())

    async def request_chunks(
        self, params: object, *, buffer: int = 4
    ) -> tuple[ChunkStream, Callable[[], Awaitable[Any]]]:
        """Send ``get_chunks``; returns the chunk stream and an awaitable for the result.

        Iterate the stream to the end (it ends when the response arrives), then
        await the result function, which raises like :meth:`request`.
        """
        self._check_open()
        rid, data = self.conn.send_request("get_chunks", params)
        stream = ChunkStream(rid, buffer)
        pending = _Pending()
        self._pending[rid] = pending
        self._streams[rid] = stream
        try:
            await self._send(data)
        except BaseException:
            self._pending.pop(rid, None)
            self._streams.pop(rid, None)
            raise

        async def result(timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Any:
            try:
                with trio.fail_after(timeout):
                    await pending.event.wait()  # also set when the connection closes
            finally:
                self._pending.pop(rid, None)
            return _outcome(pending, self)

        return stream, result

    async def notify(self, method: str, params: object) -> None:
        self._check_open()
        await self._send(self.conn.send_notification(method, params))

    async def respond(self, rid: int, result: object) -> None:
        self._check_open()
        await self._send(self.conn.send_response(rid, result))
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        """Wake the reader sooner if what we sent moved the core's timer earlier.

        The releaser's answer to ``auth`` opens the connection: from then on
        the heartbeat (§6.2) replaces the handshake deadline the reader was
        sleeping on, which may be several heartbeats away (issue 9, item 4).
        """
        timer = self.conn.get_timer()
        scope = self._wait_scope
        if scope is not None and timer is not None and timer < scope.deadline:
            scope.deadline = timer

    async def respond_error(self, rid: int, code: int, message: str, data: object = None) -> None:
        self._check_open()
        await self._send(self.conn.send_error(rid, code, message, data))

    async def send_chunk(
        self,
        rid: int,
        file: int,
        chunk: int,
        payload: bytes | memoryview,
        *,
        compressed: bool = False,
    ) -> None:
        """Send one DATA frame (DATA_ZSTD if ``compressed``); the payload is written as-is."""
        self._check_open()
        header = self.conn.send_chunk_header(
            rid, file, chunk, len(payload), compressed=compressed
        )
        await self._send(header, payload)

    async def send_chunk_run(
        self,
        rid: int,
        chunks: Sequence[tuple[int, int, bytes | bytearray | memoryview, bool]],
    ) -> None:
        """Send frames for ``(file, chunk, payload, compressed)`` in order, as one
        uninterrupted run: DATA, or DATA_ZSTD where ``compressed`` (§2.3.1).

        On a plain socket the run goes out in as few ``writev`` calls as the
        socket allows (one per writable wake-up, not one per frame: issue 14
        item 3); payloads are never copied. Raises :class:`PeerClosed`.
        """
        self._check_open()
        parts: list[bytes | bytearray | memoryview] = []
        for file, chunk, payload, compressed in chunks:
            header = self.conn.send_chunk_header(
                rid, file, chunk, len(payload), compressed=compressed
            )
            parts += (header, payload)
        await self._send(*parts)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Say ``bye`` (best effort, short deadline) and close the stream."""
        if self.closed.is_set():
            return
        if self._closing:  # another task is saying bye; it marks us closed within 1 s
            await self.closed.wait()
            return
        self._closing = True
        data = self.conn.close(code, reason)
        # The bye goes out before the peer is marked closed: marking it wakes
        # wait_closed(), whose caller then closes the stream and cancels our
        # tasks, which would swallow the bye. Shielded for the same reason.
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                async with self._send_lock:
                    data = b"".join((*self._backlog, data))  # never cut a frame in two
                    self._backlog = ()
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await self.stream.send_all(data)
        finally:
            self._mark_closed(code, reason)
            await self._abort()

    # --- receiving -----------------------------------------------------------------

    async def _reader(self) -> None:
        partial_since: float | None = None
        while not self.closed.is_set():
            deadline = math.inf
            if partial_since is not None:
                deadline = partial_since + self._frame_timeout
            timer = self.conn.get_timer()
            if timer is not None:
                deadline = min(deadline, timer)
            deadline = min(deadline, self._answers.deadline)
            data: bytes | bytearray | None = None
            filled = 0
            with trio.move_on_at(deadline) as self._wait_scope:
                try:
                    room = None if self._socket is None else self.conn.receive_buffer()
                    if room is not None:
                        assert self._socket is not None
                        filled = await self._socket.recv_into(room)
                        if not filled:
                            data = b""  # end of stream, fed as usual below
                    else:
                        # On a plain socket, while chunks flow, only the next
                        # frame's headers: its payload then goes straight into
                        # its pooled buffer (FrameDecoder.receive_hint).
                        hint = None if self._socket is None else self.conn.receive_hint()
                        size = RECEIVE_SIZE_CHUNKS if self._streams else RECEIVE_SIZE
                        if self._socket is not None:
                            data = await self._receive_plain(hint or size)
                        else:
                            data = await self.stream.receive_some(hint or size)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    self._mark_closed(CloseCode.GOING_AWAY, f"receive failed: {e}")
                    return
            now = trio.current_time()
            if filled:
                self.bytes_received += filled
                self.conn.received_into(filled, now)
            elif data is None:
                if partial_since is not None and now >= partial_since + self._frame_timeout:
                    raise _Fatal(CloseCode.TIMEOUT, "frame not completed before the frame deadline")
                if now >= self._answers.deadline:
                    self._answers.expire(now, trio.TooSlowError)
                self.conn.handle_timer(now)  # raises ConnectionTimeout when the peer is silent
                await self._flush_auto()
                continue
            else:
                self.bytes_received += len(data)
                self.conn.receive_data(data, now)
            await self._drain_events()
            await self._flush_auto()
            if self.conn.buffered_bytes:
                if partial_since is None:
                    partial_since = now
            else:
                partial_since = None

    async def _receive_plain(self, size: int) -> bytes:
        """``receive_some`` on a plain socket minus trio's per-call coroutines and
        context manager, made at every wake (a heartbeat, a push ack: issue 15).
        A checkpoint; never cancelled once it read. Raises OSError, ClosedResourceError.
        """
        assert self._socket is not None
        waited = False
        while True:
            try:
                data = os.read(self._socket.fileno(), size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._socket)
                waited = True
                continue
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def _drain_events(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, ChunkReceived):
                stream = self._streams.get(event.stream)
                if stream is not None:
                    try:
                        # Without a checkpoint while the stream has room: the
                        # chunks of one receive reach the consumer together,
                        # one wake-up for all of them instead of a scheduler
                        # round per chunk (issue 14: content-defined chunks).
                        try:
                            stream._send.send_nowait(event)
                        except trio.WouldBlock:
                            await stream._send.send(event)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._streams.pop(event.stream, None)  # consumer gave up
            elif isinstance(event, ResponseReceived | ErrorReceived):
                stream = self._streams.pop(event.id, None)
                if stream is not None:
                    stream._send.close()
                pending = self._pending.get(event.id)
                if pending is not None:
                    pending.outcome = event
                    pending.event.set()
                elif self._answers:
                    self._answers.answer(event.id, event)
            elif isinstance(event, RequestReceived):
                if event.method in self._ordered:
                    if self._ordered_send is None:
                        self._ordered_send, receive = trio.open_memory_channel[RequestReceived](
                            self.conn.max_outstanding
                        )
                        assert self._nursery is not None
                        self._nursery.start_soon(self._ordered_worker, receive)
                    self._ordered_send.send_nowait(event)
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._handle_request, event)
            elif isinstance(event, NotificationReceived):
                if self._on_notification is not None:
                    await self._on_notification(self, event)
            elif isinstance(event, ConnectionClosed):
                self._mark_closed(event.code, event.reason)
                return

    async def _handle_request(self, event: RequestReceived) -> None:
        if self._on_request is None:
            await self.respond_error(
                event.id, ErrorCode.METHOD_NOT_FOUND, f"{event.method} not served"
            )
            return
        try:
            await self._on_request(self, event)
        except PeerClosed:
            pass
        except RpcError as e:
            await self._answer_error(event.id, e.code, e.message, e.data)
        except FleetpushError as e:
            log.warning("%s: %s failed: %s", self.name, event.method, e)
            await self._answer_error(event.id, ErrorCode.INTERNAL_ERROR, str(e))
        except Exception as e:
            # A bug in one handler answers that request only; the connection,
            # and every other connection, carries on.
            log.exception("%s: %s handler crashed", self.name, event.method)
            await self._answer_error(event.id, ErrorCode.INTERNAL_ERROR, f"internal error: {e}")

    async def _answer_error(self, rid: int, code: int, message: str, data: object = None) -> None:
        # LocalProtocolError: already answered; PeerClosed: the connection is gone.
        with suppress(LocalProtocolError, PeerClosed):
            await self.respond_error(rid, code, message, data)

    async def _ordered_worker(self, receive: trio.MemoryReceiveChannel[RequestReceived]) -> None:
        async for event in receive:
            await self._handle_request(event)

    # --- lifecycle -------------------------------------------------------------------

    def _mark_closed(self, code: int, reason: str) -> None:
        if not self.closed.is_set():
            self.close_code = code
            self.close_reason = reason
            self.closed.set()
            for stream in self._streams.values():
                stream._send.close()
            self._streams.clear()
            # wake every waiting request: its outcome stays None, so it raises
            # PeerClosed (one Event per request is far cheaper than a nursery
            # waiting on two, which a push to 1000 devices pays 1000 times)
            for pending in self._pending.values():
                pending.event.set()
            self._answers.fail_all(PeerClosed(code, reason))
        # Every way a link ends comes here: give back what a partial frame
        # holds of the releaser's shared budget (Connection frame_budget).
        self.conn.release_buffers()

    async def _abort(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    async def wait_closed(self) -> None:
        await self.closed.wait()


class _Fatal(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _outcome(pending: _Pending, peer: Peer) -> Any:
    outcome = pending.outcome
    if outcome is None:
        raise PeerClosed(peer.close_code or CloseCode.GOING_AWAY, peer.close_reason or "closed")
    if isinstance(outcome, ErrorReceived):
        raise RpcError(outcome.code, outcome.message, outcome.data)
    return outcome.result


@asynccontextmanager
async def open_peer(
    stream: trio.abc.Stream,
    conn: Connection,
    *,
    name: str = "peer",
    on_request: RequestHandler | None = None,
    on_notification: NotificationHandler | None = None,
    ordered: frozenset[str] = frozenset({"get_chunks"}),
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
) -> AsyncIterator[Peer]:
    """Run a :class:`Peer` over ``stream`` for the duration of the block.

    On exit (normal or by exception) the connection is closed. A protocol
    violation by the peer closes it with the matching close code; the error is
    logged and recorded in ``peer.close_code``/``close_reason``, never raised
    into the caller's nursery.
    """
    peer = Peer(
        stream,
        conn,
        name=name,
        on_request=on_request,
        on_notification=on_notification,
        ordered=ordered,
        send_timeout=send_timeout,
        frame_timeout=frame_timeout,
    )
    async with trio.open_nursery() as nursery:
        peer._nursery = nursery

        async def reader() -> None:
            try:
                await peer._reader()
            except RemoteProtocolError as e:
                log.info("%s: protocol error: %s", peer.name, e)
                await peer.close(e.close_code, str(e))
            except _Fatal as e:
                log.info("%s: %s", peer.name, e.reason)
                await peer.close(e.code, e.reason)
            except PeerClosed:
                pass
            finally:
                peer._mark_closed(peer.close_code or CloseCode.GOING_AWAY, peer.close_reason)
                if peer._ordered_send is not None:
                    peer._ordered_send.close()

        nursery.start_soon(reader)
        try:
            yield peer
        finally:
            await peer.close(CloseCode.NORMAL, "done")
            # close() returns early when the peer already closed the link
            # (bye/EOF); the stream must still be closed, not left to the GC.
            await peer._abort()
            nursery.cancel_scope.cancel()
