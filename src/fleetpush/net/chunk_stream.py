"""The DATA frames answering one of our ``get_chunks`` requests (peer.py's reader fills it).

Its own module so that peer.py stays under the size guard; ``fleetpush.net.peer``
still exports :class:`ChunkStream`.
"""

from __future__ import annotations

import trio

from fleetpush.protocol import ChunkReceived


class ChunkStream:
    """The DATA frames answering one of our chunk requests, then its result."""

    def __init__(self, rid: int, buffer: int) -> None:
        self.id = rid
        self._send, self._receive = trio.open_memory_channel[ChunkReceived](buffer)

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> ChunkReceived:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> ChunkReceived:
        """The next chunk; raises ``trio.EndOfChannel`` once the response arrived."""
        return await self._receive.receive()

    def receive_nowait(self) -> ChunkReceived:
        """The next chunk if one is buffered, else ``trio.WouldBlock`` (or ``EndOfChannel``).

        Lets a consumer hand on every chunk that arrived together in one go.
        """
        return self._receive.receive_nowait()

    def close(self) -> None:
        """Stop consuming; chunks still arriving for this stream are dropped."""
        self._receive.close()
