"""A fault-injecting TCP proxy for tests (trio), on 127.0.0.1 only.

``FaultProxy(target_port, Faults(...))`` listens on an ephemeral port and
forwards every connection to ``target_host:target_port`` (127.0.0.1 unless
a test runs it inside a network namespace it created), injecting:

- ``latency``: seconds added to each direction (bytes keep their order; the
  pipe stays full, like a long link, not a stop-and-wait one);
- ``rate``: bytes per second per direction (paced writes);
- ``resets``: connection *i* is reset (RST, not FIN) after ``resets[i]`` bytes
  went downstream (server to client); later connections pass clean. With a
  chunk size that does not divide the thresholds, each reset lands mid-chunk;
- ``stall_after``/``stall_for``: the first connection stops forwarding in
  both directions for ``stall_for`` seconds once ``stall_after`` bytes went
  downstream (the TCP connection stays up: a stall, not a cut);
- ``stall(seconds)`` and ``reset_all()`` at any time from the test.

Counters: ``bytes_down`` and ``bytes_up`` (forwarded in total), ``connections``
and ``resets_done``. Memory is bounded: each direction holds at most
``QUEUE`` reads of ``READ_SIZE`` bytes in flight.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import attrs
import trio

READ_SIZE = 16 * 1024
QUEUE = 256


@attrs.define
class Faults:
    latency: float = 0.0
    rate: float | None = None
    resets: list[int] = attrs.field(factory=list)
    stall_after: int | None = None
    stall_for: float = 0.0
    #: reads held in flight per direction (latency needs rate x latency of them)
    queue: int = QUEUE


def _rst(stream: trio.SocketStream) -> None:
    """Close with RST: SO_LINGER on with a zero timeout."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Gate:
    """Open unless stalled; ``wait()`` blocks while closed."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()

    def close_for(self, nursery: trio.Nursery, seconds: float) -> None:
        if not self._open.is_set():
            return
        self._open = trio.Event()
        gate = self._open

        async def reopen() -> None:
            await trio.sleep(seconds)
            gate.set()

        nursery.start_soon(reopen)


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        faults: Faults | None = None,
        *,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target_host = target_host
        self.listen_host = listen_host
        self.target_port = target_port
        self.faults = faults or Faults()
        self.port = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self.resets_done = 0
        self._gate = _Gate()
        self._live: list[tuple[trio.SocketStream, trio.SocketStream, trio.CancelScope]] = []
        self._nursery: trio.Nursery | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. Use with ``await nursery.start(proxy.run)``."""
        listeners = await trio.open_tcp_listeners(0, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def stall(self, seconds: float) -> None:
        """Stop forwarding (both directions, every connection) for ``seconds``."""
        assert self._nursery is not None
        self._gate.close_for(self._nursery, seconds)

    def reset_all(self) -> None:
        """RST every live connection now."""
        for client, upstream, scope in list(self._live):
            _rst(client)
            _rst(upstream)
            scope.cancel()
            self.resets_done += 1

    async def _handle(self, client: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        reset_at = self.faults.resets[index] if index < len(self.faults.resets) else None
        stall_at = self.faults.stall_after if index == 0 else None
        async with client:
            try:
                upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
            except OSError:
                return
            async with upstream:
                entry = (client, upstream, trio.CancelScope())
                self._live.append(entry)
                try:
                    with entry[2]:
                        async with trio.open_nursery() as nursery:
                            down = _Pipe(self, upstream, client, down=True, reset_at=reset_at)
                            down.stall_at = stall_at
                            up = _Pipe(self, client, upstream, down=False, reset_at=None)
                            on_end = nursery.cancel_scope.cancel
                            nursery.start_soon(down.run, on_end)
                            nursery.start_soon(up.run, on_end)
                finally:
                    self._live.remove(entry)


class _Pipe:
    def __init__(
        self,
        proxy: FaultProxy,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        *,
        down: bool,
        reset_at: int | None,
    ) -> None:
        self.proxy = proxy
        self.src = src
        self.dst = dst
        self.down = down
        self.reset_at = reset_at
        self.stall_at: int | None = None
        self.sent = 0

    async def run(self, on_end: Callable[[], None]) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](self.proxy.faults.queue)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_quietly, self._read, send)
                await _quietly(self._write, receive)
                nursery.cancel_scope.cancel()
        finally:
            on_end()

    async def _read(self, send: trio.MemorySendChannel[tuple[float, bytes]]) -> None:
        async with send:
            while True:
                data = await self.src.receive_some(READ_SIZE)
                if not data:
                    return
                await send.send((trio.current_time() + self.proxy.faults.latency, data))

    async def _write(self, receive: trio.MemoryReceiveChannel[tuple[float, bytes]]) -> None:
        faults = self.proxy.faults
        async for due, data in receive:
            await trio.sleep_until(due)
            while data:
                await self.proxy._gate.wait()
                piece = data
                if self.reset_at is not None:
                    piece = data[: max(self.reset_at - self.sent, 0)]
                if self.stall_at is not None and self.sent + len(piece) >= self.stall_at:
                    piece = piece[: self.stall_at - self.sent]
                if piece:
                    await self.dst.send_all(piece)
                    self._count(len(piece))
                    data = data[len(piece) :]
                    if faults.rate:
                        await trio.sleep(len(piece) / faults.rate)
                if self.reset_at is not None and self.sent >= self.reset_at:
                    _rst(self.src)
                    _rst(self.dst)
                    self.proxy.resets_done += 1
                    return
                if self.stall_at is not None and self.sent >= self.stall_at:
                    self.stall_at = None
                    self.proxy.stall(faults.stall_for)
        # The source finished cleanly: pass the FIN on.
        await self.dst.send_eof()

    def _count(self, n: int) -> None:
        self.sent += n
        if self.down:
            self.proxy.bytes_down += n
        else:
            self.proxy.bytes_up += n


async def _quietly(fn: Callable[..., Awaitable[None]], *args: object) -> None:
    """Run one half of a pipe; a broken or closed socket just ends it."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await fn(*args)
