"""Requests sent without a task waiting for their answer (Peer.request_nowait).

A push to every connected device (server/push_fanout.py, issue 15) writes one
command per link from one releaser task; a trio task and cancel scope per
device waiting for its ack cost more than the write. Instead each request
sent that way leaves a callback here, answered by the link's reader when the
response comes, when its deadline passes (the reader wakes for
:attr:`PendingAnswers.deadline`), or when the link closes: exactly once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from fleetpush.protocol import ErrorReceived, ResponseReceived

log = logging.getLogger("fleetpush.net.peer")

#: The answer (response or error), ``trio.TooSlowError`` when none came in
#: time, or ``PeerClosed`` when the link ended first.
Outcome = ResponseReceived | ErrorReceived | Exception
AnswerCallback = Callable[[Outcome], None]


class PendingAnswers:
    """Callbacks by request id, each with its deadline (trio thread only)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._by_id: dict[int, tuple[float, AnswerCallback]] = {}
        #: the earliest deadline (inf when none): when the reader must wake
        self.deadline = math.inf

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def add(self, rid: int, deadline: float, on_answer: AnswerCallback) -> None:
        self._by_id[rid] = (deadline, on_answer)
        self.deadline = min(self.deadline, deadline)

    def answer(self, rid: int, outcome: Outcome) -> None:
        """Call ``rid``'s callback, if it is still waiting, with ``outcome``."""
        entry = self._by_id.pop(rid, None)
        if entry is None:
            return  # not ours, or answered late after its deadline: dropped
        try:
            entry[1](outcome)
        except Exception:
            # The callback is the sender's bookkeeping: the link carries on.
            log.exception("%s: answer callback for request %d failed", self._name, rid)

    def expire(self, now: float, late: Callable[[], Exception]) -> None:
        """Answer every callback whose deadline passed with ``late()``."""
        for rid, (deadline, _) in list(self._by_id.items()):
            if deadline <= now:
                self.answer(rid, late())
        self.deadline = min((d for d, _ in self._by_id.values()), default=math.inf)

    def fail_all(self, error: Exception) -> None:
        """The link ended: answer every callback with ``error``."""
        for rid in list(self._by_id):
            self.answer(rid, error)
        self.deadline = math.inf
