"""Connection admission: separate budgets for handshaking and authenticated peers.

Before issue 10 (item 7) every connection counted against one
``max_connections``, handshaking ones included, with no per-source limit: with
the defaults, strangers that connected and never finished their handshake held
the slots, and honest devices got in 1 time in 30. Now:

- at most ``max_handshaking`` connections may be in their handshake at once,
  and at most ``max_handshaking_per_source`` of them from one source address;
- at most ``max_connections`` authenticated connections (checked when a
  connection arrives: a full releaser turns new ones away at once);
- when more than half the handshake budget is in use, a new connection gets
  the shorter ``busy_handshake_timeout`` to finish its handshake, so slots
  held by strangers turn over quickly.

A refused connection gets ``bye`` ``TOO_MANY_CONNECTIONS`` (app.py). The
handshake slot is released as soon as the session authenticates, and in any
case when the connection ends (:meth:`Slot.release` is idempotent).
"""

from __future__ import annotations

from collections import Counter

import trio


class Slot:
    """One connection's handshake slot and, once authenticated, its connection slot."""

    __slots__ = ("_admission", "authenticated", "handshaking", "source")

    def __init__(self, admission: Admission, source: str) -> None:
        self._admission = admission
        self.source = source
        self.handshaking = True
        self.authenticated = False

    def authenticate(self) -> None:
        """The session authenticated: from handshake budget to connection budget."""
        if self.handshaking:
            self._admission._leave_handshake(self)
        if not self.authenticated:
            self.authenticated = True
            self._admission.authenticated += 1

    def release(self) -> None:
        """The connection ended (safe to call more than once)."""
        if self.handshaking:
            self._admission._leave_handshake(self)
        if self.authenticated:
            self.authenticated = False
            self._admission.authenticated -= 1


class Admission:
    """Counts handshaking and authenticated connections (trio thread only)."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_handshaking: int,
        max_handshaking_per_source: int,
    ) -> None:
        self.max_connections = max_connections
        self.max_handshaking = max_handshaking
        self.max_handshaking_per_source = max_handshaking_per_source
        self.handshaking = 0
        self.authenticated = 0
        self._by_source: Counter[str] = Counter()
        #: connections turned away, by reason (for tests and metrics)
        self.refused: Counter[str] = Counter()

    @property
    def under_pressure(self) -> bool:
        """More than half the handshake budget is in use."""
        return self.handshaking * 2 > self.max_handshaking

    def handshaking_from(self, source: str) -> int:
        return self._by_source[source]

    def admit(self, source: str) -> Slot | str:
        """A slot for a new connection from ``source``, or why it is refused."""
        if self.authenticated >= self.max_connections:
            reason = "too many connections"
        elif self.handshaking >= self.max_handshaking:
            reason = "too many connections in their handshake"
        elif self._by_source[source] >= self.max_handshaking_per_source:
            reason = "too many handshakes from this address"
        else:
            self.handshaking += 1
            self._by_source[source] += 1
            return Slot(self, source)
        self.refused[reason] += 1
        return reason

    def _leave_handshake(self, slot: Slot) -> None:
        slot.handshaking = False
        self.handshaking -= 1
        self._by_source[slot.source] -= 1
        if self._by_source[slot.source] <= 0:
            del self._by_source[slot.source]


def source_of(stream: trio.abc.Stream) -> str:
    """The peer's address (no port): the unit of the per-source handshake cap."""
    if isinstance(stream, trio.SocketStream):
        try:
            name = stream.socket.getpeername()
        except OSError:
            return "?"
        if isinstance(name, tuple) and name:
            return str(name[0])
        return str(name)
    return "?"
