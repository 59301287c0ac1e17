"""The releaser's requests about the supervised app (specs/PROTOCOL.md §7.7; issue 13, part 3).

``__app_control__`` starts, stops or restarts the app and is answered with
its new :class:`AppStatus`; ``__app_logs__`` is answered with the app's last
lines and, with ``follow``, keeps sending new lines as ``app_log``
notifications on that connection until the releaser asks again without
``follow`` or the connection closes.

Only a device that supervises its app (``fleetpush agent``) has a
:class:`SupervisedApp`; an embedded updater answers ``UNAVAILABLE`` with a
sentence the operator reads. The follower is bounded so a chatty app cannot
flood the link or the releaser: at most :data:`BATCH_LINES` lines and
:data:`BATCH_BYTES` bytes per :data:`BATCH_INTERVAL`, the rest dropped and
counted in the next batch's ``dropped``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Final, Protocol

import trio
from fleetpush.protocol import ErrorCode, RpcError
from fleetpush.protocol.messages import MAX_LOG_LINE, AppCommand, AppLogLines, AppLogs, AppStatus

from fleetpush.net.peer import Peer, PeerClosed, TransportError

log = logging.getLogger("fleetpush.client.app_remote")

#: One ``app_log`` batch at most this often...
BATCH_INTERVAL: Final = 0.25
#: ...with at most this many lines...
BATCH_LINES: Final = 200
#: ...and this many bytes of text (so at most 256 KiB/s of logs per device).
BATCH_BYTES: Final = 64 * 1024
#: Lines the agent keeps queued for one follower before it drops and counts.
QUEUE_LINES: Final = 2000

NO_SUPERVISOR: Final = (
    "this device runs the updater embedded in its app: there is no supervisor to "
    "control it (run it under `fleetpush agent`)"
)


class LogFollow(Protocol):
    """New lines of the app's output, as they come, and how many were lost."""

    receive: trio.MemoryReceiveChannel[str]

    def take_dropped(self) -> int: ...


class SupervisedApp(Protocol):
    """What the agent lets the releaser do with its app (agent.py implements it)."""

    async def control(self, action: str) -> AppStatus:
        """Start, stop or restart the app; its status after. Raises UpdaterError."""
        ...

    def log_lines(self, count: int) -> list[str]:
        """The newest ``count`` lines of the app's output."""
        ...

    def follow_logs(self) -> AbstractContextManager[LogFollow]:
        """New lines from now on, for as long as the block runs."""
        ...


class RemoteApp:
    """Answers the releaser's app requests on one device.

    ``app`` is None for an embedded updater. ``spawn`` runs a task for as long
    as the releaser connection lives (the link's own nursery).
    """

    def __init__(self, app: SupervisedApp | None) -> None:
        self.app = app
        self._follow_scope: trio.CancelScope | None = None

    async def handle(
        self, peer: Peer, method: str, params: object, spawn: Callable[..., None]
    ) -> object:
        """The answer to ``method`` (``__app_control__`` or ``__app_logs__``). Raises RpcError."""
        app = self.app
        if app is None:
            raise RpcError(ErrorCode.UNAVAILABLE, NO_SUPERVISOR)
        if method == "__app_control__":
            assert isinstance(params, AppCommand)
            log.info("the releaser asks to %s the app", params.action)
            try:
                return await app.control(params.action)
            except Exception as e:
                raise RpcError(ErrorCode.INTERNAL_ERROR, f"{params.action} failed: {e}") from e
        assert isinstance(params, AppLogs)
        # A new request replaces the follower of the previous one (one per link).
        if self._follow_scope is not None:
            self._follow_scope.cancel()
            self._follow_scope = None
        tail = [line[:MAX_LOG_LINE] for line in app.log_lines(params.lines)] if params.lines else []
        if params.follow:
            scope = trio.CancelScope()
            self._follow_scope = scope
            spawn(self._follow, peer, app, scope)
        return AppLogLines(lines=tail)

    async def _follow(self, peer: Peer, app: SupervisedApp, scope: trio.CancelScope) -> None:
        with scope, app.follow_logs() as follow:
            try:
                while True:
                    batch = await _next_batch(follow)
                    await peer.notify("app_log", batch)
            except (PeerClosed, TransportError, trio.EndOfChannel):
                pass
        if self._follow_scope is scope:
            self._follow_scope = None


async def _next_batch(follow: LogFollow) -> AppLogLines:
    """Wait for a line, then gather for BATCH_INTERVAL within the caps."""
    first = await follow.receive.receive()
    lines, size, dropped = [first[:MAX_LOG_LINE]], len(first), 0
    with trio.move_on_after(BATCH_INTERVAL):
        async for line in follow.receive:
            if len(lines) >= BATCH_LINES or size + len(line) > BATCH_BYTES:
                dropped += 1
                continue
            lines.append(line[:MAX_LOG_LINE])
            size += len(line)
    return AppLogLines(lines=lines, dropped=dropped + follow.take_dropped())
