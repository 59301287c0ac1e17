"""Fleet events: the history in the database and the live feed to watching operators.

Seqs are MAX+1 in one releaser; with several releasers on one PostgreSQL
(cluster_bus.py) they come from a shared sequence in blocks: unique, growing
per releaser, not in global time order (specs/SCALE.md §5), and the other
releasers' events arrive through :meth:`EventHub.deliver`.

Kinds: ``connected``, ``disconnected``, ``progress``, ``app_status``,
``enrollment``, ``release_status``, ``push``, ``command_sent``,
``command_result``, ``deployment``, ``deployment_device`` (§7.7.1), and
``dropped`` (see below).

The history is bounded: every ``PRUNE_EVERY`` events the oldest beyond
``history_limit`` are deleted. ``downloading`` progress is persisted at most
once a second per device (watchers still see every one).

Each watcher has a queue bounded by count (``queue_size``) and by bytes
(``queue_bytes``, each event weighed by its msgpack encoding, computed once per
event): a watch that never read plus one chatty device took the releaser
+1.4 GiB when only the count was bounded (issue 10, item 6). A watcher that
does not keep up loses the events that do not fit, never the server's memory:
they are counted, and once its queue has drained it receives one ``dropped``
event with ``data.count``, telling the console to refresh with
``list_devices``. A watcher that stops reading altogether is dropped by the
send deadline like any peer. The watch handler unsubscribes on every path
(operator_api.watch); :attr:`EventHub.watchers` counts what is subscribed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import trio
from fleetpush.protocol import FleetpushError, codec
from fleetpush.protocol.messages import Event, EventFilter, EventList

from . import db

PRUNE_EVERY: Final = 1000
_INSERT_EVENT: Final = (
    "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)"
)
_PRUNE_BY_SEQ: Final = "DELETE FROM events WHERE seq <= ?"
_PRUNE_BY_COUNT: Final = (
    "DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)

log = logging.getLogger("fleetpush.server")


class Watcher:
    """One watching operator's queue, bounded by count and by bytes (trio thread only)."""

    def __init__(self, hub: EventHub, size: int, max_bytes: int) -> None:
        self._hub = hub
        self.send, self._receive = trio.open_memory_channel[tuple[Event, int]](size)
        self.max_bytes = max_bytes
        #: encoded bytes of the events waiting in the queue
        self.queued_bytes = 0
        self.dropped = 0

    def offer(self, event: Event, size: int) -> None:
        """Queue ``event`` (``size`` encoded bytes) unless the queue is full."""
        if self.queued_bytes + size > self.max_bytes:
            self.dropped += 1
            return
        try:
            self.send.send_nowait((event, size))
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        else:
            self.queued_bytes += size

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> Event:
        """The next queued event (``StopAsyncIteration`` once the watcher is closed)."""
        try:
            event, size = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        self.queued_bytes -= size
        return event

    def take_nowait(self) -> Event:
        """The next queued event without waiting. Raises ``trio.WouldBlock``."""
        event, size = self._receive.receive_nowait()
        self.queued_bytes -= size
        return event

    def take_dropped(self) -> Event | None:
        """A ``dropped`` event once the queue is empty and events were lost, else None."""
        if not self.dropped or self._receive.statistics().current_buffer_used:
            return None
        count, self.dropped = self.dropped, 0
        return Event(
            seq=self._hub.last_seq, time=time.time(), kind="dropped", data={"count": count}
        )

    def close(self) -> None:
        self._hub.unsubscribe(self)
        self.send.close()


class EventHub:
    def __init__(
        self,
        conn: db.Connection,
        *,
        history_limit: int,
        queue_size: int,
        queue_bytes: int = 4 * 1024 * 1024,
        writer: db.WriteBehind | None = None,
    ) -> None:
        self.conn = conn
        self.writer = writer if writer is not None else db.WriteBehind(conn)
        # A history row's key (seq) is given out here, before it is queued:
        # its INSERT commutes with every other queued row (db.WriteBehind).
        self.writer.commuting.add(_INSERT_EVENT)
        self.writer.barriers.update((_PRUNE_BY_SEQ, _PRUNE_BY_COUNT))
        self.history_limit = history_limit
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self._watchers: set[Watcher] = set()
        self._listeners: list[Callable[[Event], None]] = []
        row = conn.execute("SELECT MAX(seq) FROM events").fetchone()
        #: the highest seq this hub emitted or relayed
        self.last_seq = int(row[0] or 0)
        self._since_prune = 0
        #: where seqs come from: MAX+1 in one process (SQLite); with several
        #: releasers on PostgreSQL, blocks of a database sequence (cluster_batch.SeqBlocks)
        self.next_seq: Callable[[], int] = lambda: self.last_seq + 1
        #: True when next_seq is a shared sequence (seqs with gaps)
        self.shared_seqs = False
        #: told every event persisted here (the cluster bus announces it)
        self.on_persist: Callable[[Event], None] | None = None
        #: added to this releaser's ``connected`` events with several releasers:
        #: which releaser holds the link (``releaser``, ``releaser_address``)
        self.stamp: dict[str, str] | None = None

    def emit(
        self,
        kind: str,
        device_id: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        persist: bool = True,
        encoded: str | None = None,
    ) -> Event:
        """Store (unless not ``persist``) and hand out one event.

        ``encoded``: ``data`` already as its JSON text (db.dumps), when the
        caller emits many events sharing one payload (a push's acks,
        push_fanout.py): the row then costs no serialisation. ``data`` is
        shared by the watchers and listeners and must not be changed.
        """
        try:
            seq = self.next_seq()
        except FleetpushError as e:
            # Several releasers, PostgreSQL unreachable and the seq block spent:
            # the watchers and listeners still hear of it; the history cannot
            # store it without a unique seq (the emitter must not fail for that).
            log.warning("a %s event is not stored: %s", kind, e)
            seq, persist = self.last_seq, False
        self.last_seq = max(self.last_seq, seq)
        data = data or {}
        if kind == "connected" and self.stamp is not None:
            # Which releaser holds the link: the others' presence (cluster_bus.py).
            data = {**data, **self.stamp}
            encoded = None
        now = time.time()
        if persist:
            text = encoded if encoded is not None else db.dumps(data)
            self.writer.add(_INSERT_EVENT, (seq, now, kind, device_id, text))
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                if self.shared_seqs:
                    # Block seqs leave gaps (cluster_batch.SeqBlocks): keep the
                    # newest history_limit rows by count, not by seq distance.
                    self.writer.add(_PRUNE_BY_COUNT, (self.history_limit,))
                else:
                    self.writer.add(_PRUNE_BY_SEQ, (self.last_seq - self.history_limit,))
        event = Event(seq=seq, time=now, kind=kind, device_id=device_id, data=data)
        if persist and self.on_persist is not None:
            self.on_persist(event)
        self._fan_out(event)
        return event

    def deliver(self, event: Event) -> None:
        """Hand another releaser's stored event to the watchers and listeners (not stored again).

        With several releasers (cluster_bus.py) seqs are unique but not in
        global order: a remote event may carry a lower seq than one already
        seen here (specs/SCALE.md, "ordering").
        """
        self.last_seq = max(self.last_seq, event.seq)
        self._fan_out(event)

    def _fan_out(self, event: Event) -> None:
        if self._watchers:
            size = len(codec.packb(codec.to_wire(event)))  # once, for every watcher
            for watcher in list(self._watchers):
                watcher.offer(event, size)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                # The emitter (a device's notification, a handler) must not fail
                # because a listener did: log it and carry on.
                log.exception("an event listener failed on a %s event", event.kind)

    def query(self, f: EventFilter) -> EventList:
        """One page of the stored history, newest first (``list_events``, §7.7).

        Each filter is a column or expression with its own index (db.py), so
        a page of a million-event table is an index walk, not a scan.
        """
        self.writer.flush()
        query = "SELECT * FROM events WHERE 1 = 1"
        args: list[Any] = []
        if f.device_id is not None:
            query += " AND device_id = ?"
            args.append(f.device_id)
        if f.kinds:
            query += f" AND kind IN ({', '.join('?' * len(f.kinds))})"
            args += f.kinds
        if f.since is not None:
            query += " AND time >= ?"
            args.append(f.since)
        if f.before is not None:
            query += " AND seq < ?"
            args.append(f.before)
        tail = " ORDER BY seq DESC LIMIT ?"
        if f.push_id is None:
            rows = list(self.conn.execute(query + tail, [*args, f.limit + 1]))
        else:
            # A push id, or a deployment id (§7.7.1), each expression with its
            # own index. Asked as one OR (or one IN over both), SQLite walked
            # the whole table by seq on a million events (180-260 ms,
            # scripts/fleet_views_bench.py); two index walks merged here read
            # only the matching rows.
            # INDEXED BY: most events carry no deployment_id, so the statistics
            # say its index holds one value for every row, and the planner
            # preferred a walk of the whole table by seq to it.
            rows = []
            for key, index in (("push_id", "events_push"), ("deployment_id", "events_deployment")):
                indexed = query.replace("FROM events", f"FROM events INDEXED BY {index}", 1)
                rows += self.conn.execute(
                    indexed + f" AND json_extract(data, '$.{key}') = ?" + tail,
                    [*args, f.push_id, f.limit + 1],
                )
            unique = {r["seq"]: r for r in rows}
            rows = [unique[seq] for seq in sorted(unique, reverse=True)[: f.limit + 1]]
        events = [_event(r) for r in rows]
        more = len(events) > f.limit
        events = events[: f.limit]
        return EventList(events=events, next=events[-1].seq if more and events else None)

    def prune_older_than(self, cutoff: float) -> int:
        """Delete the events before ``cutoff`` (Unix time; ``event_retention``); how many."""
        self.writer.flush()
        cur = self.conn.execute("DELETE FROM events WHERE time < ?", (cutoff,))
        return cur.rowcount

    def history(self, count: int, device_id: str | None = None) -> list[Event]:
        """The newest ``count`` stored events, oldest first."""
        if count <= 0:
            return []
        self.writer.flush()
        if device_id is None:
            rows = self.conn.execute("SELECT * FROM events ORDER BY seq DESC LIMIT ?", (count,))
        else:
            rows = self.conn.execute(
                "SELECT * FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
                (device_id, count),
            )
        out = [_event(r) for r in rows]
        out.reverse()
        return out

    def subscribe(self) -> Watcher:
        watcher = Watcher(self, self.queue_size, self.queue_bytes)
        self._watchers.add(watcher)
        return watcher

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every event, synchronously, in order, none dropped.

        For the releaser's own consumers (the deployment scheduler, rollout.py),
        which must see every outcome: unlike a watcher, a listener has no queue
        to overflow. It must be quick and must not await; it may emit.
        """
        self._listeners.append(listener)

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    @property
    def queued_bytes(self) -> int:
        """The most bytes any one watcher has queued."""
        return max((w.queued_bytes for w in self._watchers), default=0)


def _event(r: db.Row) -> Event:
    return Event(
        seq=r["seq"],
        time=r["time"],
        kind=r["kind"],
        device_id=r["device_id"],
        data=db.loads(r["data"]),
    )
