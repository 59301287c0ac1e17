"""The pure half of the cluster bus (issue 15, part 2): no I/O, no clock of its own.

Several releasers on one PostgreSQL tell each other *which rows* changed,
never the rows themselves (specs/SCALE.md "Several releasers"): a
notification carries the sender's releaser id, event seqs and push ids, and
the receiver reads those rows. What is decided here:

- :class:`Outbox`: ids gathered on the trio thread, taken at most once per
  :data:`BATCH_INTERVAL` as payloads of at most :data:`MAX_PAYLOAD` bytes
  (PostgreSQL refuses a NOTIFY payload of 8000 bytes or more), plus an empty
  heartbeat every :data:`HEARTBEAT` seconds so that the others know this
  releaser is alive (:class:`Presence`);
- :func:`encode` / :func:`decode` of a payload;
- :class:`Seen`: the seqs already handed to the local event hub, bounded,
  so a catch-up from the rows and a late notification deliver an event once;
- :class:`SeqBlocks`: event seqs taken from a database sequence a block at a
  time, so two releasers never collide and only one event in
  :data:`SEQ_BLOCK` costs a round trip;
- :class:`Presence`: which other releaser holds a device's live link, as
  their ``connected``/``disconnected`` events said, forgotten once that
  releaser has been silent for :data:`SILENT_AFTER` seconds.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs

from .errors import ServerError

#: PostgreSQL's limit is 8000 bytes per payload; the rest is headroom.
MAX_PAYLOAD: Final = 7900
#: Seconds between two batches: at most one NOTIFY per releaser per interval
#: (more only when one batch is split over several payloads).
BATCH_INTERVAL: Final = 0.1
#: Seconds between two empty notifications of an idle releaser.
HEARTBEAT: Final = 5.0
#: A releaser not heard of for this long is taken for dead: its devices are
#: no longer counted online (they reconnect elsewhere and say so).
SILENT_AFTER: Final = 3 * HEARTBEAT
#: Event seqs per database round trip (the sequence's INCREMENT BY).
SEQ_BLOCK: Final = 1000
#: A block older than this is given up for a fresh one: another releaser's
#: rows are then never more than this far behind in seq order (see
#: specs/SCALE.md, "ordering").
SEQ_BLOCK_TTL: Final = 10.0


class BusPayloadError(ServerError):
    """A notification's payload is not one this releaser understands."""


class SeqUnavailable(ServerError):
    """No event seq can be had: the block is spent and the database unreachable."""


@attrs.frozen(kw_only=True)
class Note:
    """One notification: who sent it and the ids of the rows it wrote."""

    origin: str
    events: tuple[int, ...] = ()
    pushes: tuple[str, ...] = ()
    #: forwarded calls' row ids, requests and answers alike (cluster_calls.py)
    calls: tuple[str, ...] = ()


def encode(note: Note) -> str:
    doc: dict[str, Any] = {"r": note.origin, "e": list(note.events), "p": list(note.pushes)}
    if note.calls:  # absent otherwise: the payloads of releasers without calls are unchanged
        doc["c"] = list(note.calls)
    return json.dumps(doc, separators=(",", ":"))


def decode(text: str) -> Note:
    """Raises :class:`BusPayloadError` (not JSON, wrong shape)."""
    try:
        doc = json.loads(text)
        origin = doc["r"]
        events = tuple(int(s) for s in doc.get("e", ()))
        pushes = tuple(str(p) for p in doc.get("p", ()))
        calls = tuple(str(c) for c in doc.get("c", ()))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BusPayloadError(f"bad cluster notification {text[:80]!r}: {e}") from e
    if not isinstance(origin, str):
        raise BusPayloadError(f"bad cluster notification {text[:80]!r}: no releaser id")
    return Note(origin=origin, events=events, pushes=pushes, calls=calls)


def split(
    origin: str, events: Iterable[int], pushes: Iterable[str], calls: Iterable[str] = ()
) -> list[str]:
    """The ids as payloads of at most :data:`MAX_PAYLOAD` bytes each, in order."""
    base = len(encode(Note(origin=origin))) + len(',"c":[]')
    out: list[str] = []
    cur_e: list[int] = []
    cur_p: list[str] = []
    cur_c: list[str] = []
    size = base

    def close() -> None:
        nonlocal cur_e, cur_p, cur_c, size
        if cur_e or cur_p or cur_c:
            out.append(
                encode(
                    Note(
                        origin=origin,
                        events=tuple(cur_e),
                        pushes=tuple(cur_p),
                        calls=tuple(cur_c),
                    )
                )
            )
        cur_e, cur_p, cur_c, size = [], [], [], base

    for seq in events:
        cost = len(str(seq)) + 1
        if size + cost > MAX_PAYLOAD:
            close()
        cur_e.append(seq)
        size += cost
    for push in pushes:
        cost = len(json.dumps(push)) + 1
        if size + cost > MAX_PAYLOAD:
            close()
        cur_p.append(push)
        size += cost
    for call in calls:
        cost = len(json.dumps(call)) + 1
        if size + cost > MAX_PAYLOAD:
            close()
        cur_c.append(call)
        size += cost
    close()
    return out


@attrs.define
class OutboxFigures:
    """What the bus sent (for the benchmark and the log)."""

    notifies: int = 0
    payload_bytes: int = 0
    ids: int = 0
    largest: int = 0
    heartbeats: int = 0


class Outbox:
    """Ids waiting to be announced (trio thread only)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._events: list[int] = []
        self._pushes: list[str] = []
        self._calls: list[str] = []
        self._last_sent = float("-inf")
        self.figures = OutboxFigures()

    def add_event(self, seq: int) -> None:
        self._events.append(seq)

    def add_push(self, push_id: str) -> None:
        self._pushes.append(push_id)

    def add_call(self, call_id: str) -> None:
        self._calls.append(call_id)

    def __bool__(self) -> bool:
        return bool(self._events or self._pushes or self._calls)

    def take(self, now: float) -> list[str]:
        """The payloads to send now (maybe none), and forget their ids."""
        if self:
            payloads = split(self.origin, self._events, self._pushes, self._calls)
            self.figures.ids += len(self._events) + len(self._pushes) + len(self._calls)
            self._events, self._pushes, self._calls = [], [], []
        elif now - self._last_sent >= HEARTBEAT:
            payloads = [encode(Note(origin=self.origin))]
            self.figures.heartbeats += 1
        else:
            return []
        self._last_sent = now
        self.figures.notifies += len(payloads)
        for p in payloads:
            self.figures.payload_bytes += len(p)
            self.figures.largest = max(self.figures.largest, len(p))
        return payloads


class Seen:
    """The last ``size`` seqs seen, for membership (trio thread only)."""

    def __init__(self, size: int = 200_000) -> None:
        self._set: set[int] = set()
        self._order: deque[int] = deque()
        self._size = size

    def add(self, seq: int) -> bool:
        """Remember ``seq``; True if it was new."""
        if seq in self._set:
            return False
        self._set.add(seq)
        self._order.append(seq)
        if len(self._order) > self._size:
            self._set.discard(self._order.popleft())
        return True

    def __contains__(self, seq: object) -> bool:
        return seq in self._set


class SeqBlocks:
    """Event seqs from blocks of :data:`SEQ_BLOCK` (``take_block`` returns a block's first seq,
    or raises :class:`SeqUnavailable`, as does a call once the block is spent).

    Per releaser the seqs only grow; across releasers they are unique but
    interleave by block, and a block is given up after ``ttl`` seconds so an
    idle releaser does not write far behind the others.
    """

    def __init__(
        self,
        take_block: Callable[[], int],
        clock: Callable[[], float],
        *,
        size: int = SEQ_BLOCK,
        ttl: float = SEQ_BLOCK_TTL,
    ) -> None:
        self._take_block = take_block
        self._clock = clock
        self._size = size
        self._ttl = ttl
        self._next = 0
        self._end = 0
        self._taken = float("-inf")
        self.blocks = 0

    def __call__(self) -> int:
        now = self._clock()
        if self._next >= self._end or now - self._taken > self._ttl:
            try:
                start = self._take_block()
            except SeqUnavailable:
                if self._next >= self._end:
                    raise
                # Unreachable database: the old block is still unique, only older.
            else:
                self._next, self._end, self._taken = start, start + self._size, now
                self.blocks += 1
        seq = self._next
        self._next += 1
        return seq


class Presence:
    """Which other releaser holds each device's live link (trio thread only)."""

    def __init__(self) -> None:
        self._where: dict[str, str] = {}
        self._heard: dict[str, float] = {}

    def heard(self, releaser: str, now: float) -> None:
        self._heard[releaser] = now

    def event(self, releaser: str, kind: str, device_id: str | None) -> None:
        """A ``connected``/``disconnected`` event another releaser wrote."""
        if device_id is None:
            return
        if kind == "connected":
            self._where[device_id] = releaser
        elif kind == "disconnected" and self._where.get(device_id) == releaser:
            del self._where[device_id]

    def local(self, device_id: str) -> None:
        """The device connected here: it is no longer on another releaser."""
        self._where.pop(device_id, None)

    def where(self, device_id: str, now: float) -> str | None:
        """The live releaser holding ``device_id``, or None."""
        releaser = self._where.get(device_id)
        if releaser is None:
            return None
        if now - self._heard.get(releaser, float("-inf")) > SILENT_AFTER:
            return None
        return releaser

    def releasers(self, now: float) -> list[str]:
        return sorted(r for r, t in self._heard.items() if now - t <= SILENT_AFTER)

    def summary(self) -> dict[str, Any]:
        return {"devices": len(self._where), "releasers": len(self._heard)}
