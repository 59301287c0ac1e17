"""Fleet events: the history in SQLite and the live feed to watching operators.

Kinds: ``connected``, ``disconnected``, ``progress``, ``app_status``,
``enrollment``, ``release_status``, ``push``, ``command_sent``,
``command_result``, and ``dropped`` (see below).

The history is bounded: every ``PRUNE_EVERY`` events the oldest beyond
``history_limit`` are deleted. ``downloading`` progress is persisted at most
once a second per device (watchers still see every one).

Each watcher has a bounded queue. A watcher that does not keep up loses the
events that do not fit, never the server's memory: they are counted, and once
its queue has drained it receives one ``dropped`` event with ``data.count``,
telling the console to refresh with ``list_devices``. A watcher that stops
reading altogether is dropped by the send deadline like any peer.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

import trio
from fleetpush.protocol.messages import Event

from . import db

PRUNE_EVERY: Final = 1000


class Watcher:
    def __init__(self, hub: EventHub, size: int) -> None:
        self._hub = hub
        self.send, self.receive = trio.open_memory_channel[Event](size)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        try:
            self.send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def take_dropped(self) -> Event | None:
        """A ``dropped`` event once the queue is empty and events were lost, else None."""
        if not self.dropped or self.receive.statistics().current_buffer_used:
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
        conn: sqlite3.Connection,
        *,
        history_limit: int,
        queue_size: int,
        writer: db.WriteBehind | None = None,
    ) -> None:
        self.conn = conn
        self.writer = writer if writer is not None else db.WriteBehind(conn)
        self.history_limit = history_limit
        self.queue_size = queue_size
        self._watchers: set[Watcher] = set()
        row = conn.execute("SELECT MAX(seq) FROM events").fetchone()
        self.last_seq = int(row[0] or 0)
        self._since_prune = 0

    def emit(
        self,
        kind: str,
        device_id: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        persist: bool = True,
    ) -> Event:
        self.last_seq += 1
        data = data or {}
        now = time.time()
        if persist:
            self.writer.add(
                "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)",
                (self.last_seq, now, kind, device_id, db.dumps(data)),
            )
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                self.writer.add(
                    "DELETE FROM events WHERE seq <= ?", (self.last_seq - self.history_limit,)
                )
        event = Event(seq=self.last_seq, time=now, kind=kind, device_id=device_id, data=data)
        if self._watchers:
            for watcher in list(self._watchers):
                watcher.offer(event)
        return event

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
        out = [
            Event(
                seq=r["seq"],
                time=r["time"],
                kind=r["kind"],
                device_id=r["device_id"],
                data=db.loads(r["data"]),
            )
            for r in rows
        ]
        out.reverse()
        return out

    def subscribe(self) -> Watcher:
        watcher = Watcher(self, self.queue_size)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watchers(self) -> int:
        return len(self._watchers)
