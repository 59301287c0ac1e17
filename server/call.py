"""What a handler gets besides the services and the params: who calls, and how to answer.

The session builds one :class:`Caller` per authenticated connection (who it
is, its logger, a task spawner, the little state handlers keep per
connection) and one :class:`Call` per request or notification. A handler
answers through the call: a plain handler returns its result and the session
responds; a streaming handler (``get_chunks``, ``watch``) answers with
:meth:`Call.respond` itself, sends DATA frames (specs/PROTOCOL.md §7.8) or
``event`` notifications (§7.7), and may start a task that lives as long as the
connection. A handler never sees the ``Session`` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from fleetpush.net.peer import Peer

#: Start ``fn(*args)`` in the connection's nursery (it ends with the connection).
Spawn = Callable[..., None]


@attrs.define(eq=False)
class Caller:
    """One authenticated connection, as handlers see it."""

    #: "device" or "operator" (specs/PROTOCOL.md §5.1).
    role: str
    #: the device id, or the operator's label ``name (key prefix)``.
    name: str
    #: the app a device's hello named (None: it may read no release, issue 10
    #: item 9; always None for operators).
    app: str | None
    log: logging.LoggerAdapter[logging.Logger]
    spawn: Spawn
    #: an operator's ``watch`` is running on this connection.
    watching: bool = False
    #: when a device's ``downloading`` progress was last written to the history.
    progress_persisted: float = 0.0
    #: the outcome steps (state, version) of a device's ``update_progress`` already
    #: stored as events on this connection: its ``report_outcomes`` copy is not
    #: shown again (device_api.py; issue 11, item 6). Newest last, bounded.
    relayed: list[tuple[str, str]] = attrs.field(factory=list)
    #: what a device's hello announced (§5.1): "blake3" lets it get blake3 releases (§7.2).
    capabilities: frozenset[str] = frozenset()

    @property
    def operator(self) -> str | None:
        return self.name if self.role == "operator" else None


class Call:
    """One request (or notification, ``rid`` None) from a :class:`Caller`."""

    __slots__ = ("_peer", "_rid", "caller")

    def __init__(self, caller: Caller, peer: Peer, rid: int | None) -> None:
        self.caller = caller
        self._peer = peer
        self._rid = rid

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return self.caller.log

    @property
    def operator(self) -> str | None:
        return self.caller.operator

    @property
    def device_id(self) -> str:
        """The calling device's id (device methods only: the role gate ran before)."""
        assert self.caller.role == "device"
        return self.caller.name

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        self.caller.spawn(fn, *args)

    def _request_id(self) -> int:
        assert self._rid is not None, "a notification has no answer"
        return self._rid

    async def respond(self, result: object) -> None:
        """Answer the request. Raises ``PeerClosed``."""
        await self._peer.respond(self._request_id(), result)

    async def notify(self, method: str, params: object) -> None:
        """Send a notification on this connection. Raises ``PeerClosed``."""
        await self._peer.notify(method, params)

    def start_chunks(self, wanted: list[tuple[int, int]]) -> None:
        """Announce the DATA frames about to answer this request (§7.8)."""
        self._peer.conn.start_chunks(self._request_id(), wanted)

    async def send_chunk(
        self, file: int, chunk: int, data: bytes | memoryview, *, compressed: bool = False
    ) -> None:
        """One DATA (or, ``compressed``, DATA_ZSTD) frame of this request's answer.

        Raises ``PeerClosed``.
        """
        await self._peer.send_chunk(self._request_id(), file, chunk, data, compressed=compressed)

    async def send_chunk_run(
        self, chunks: Sequence[tuple[int, int, bytes | bytearray, bool]]
    ) -> None:
        """Frames ``(file, chunk, data, compressed)`` of this request's answer, in
        order, as one run (DATA_ZSTD where ``compressed``). Raises ``PeerClosed``.
        """
        await self._peer.send_chunk_run(self._request_id(), chunks)
