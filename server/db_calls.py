"""Database calls off the trio thread on PostgreSQL (issue 15, part 1).

The stores (registry.py, events.py, deployments.py, ...) are synchronous:
each method sends its statements and returns. On SQLite that is right on the
trio thread: the database is in-process, a call costs microseconds, and its
connection may be used by the thread that opened it only (db.py). On
PostgreSQL each statement is a network round trip (0.1-0.9 ms on loopback, a
999-row write-behind flush 25-87 ms, ``scripts/storage_calls_bench.py``), and
while the trio thread waits no device is served. So the hot and slow paths
call ``await services.calls.run(store.method, *args)``:

- SQLite, or PostgreSQL with ``database_pool = 0``: ``fn(*args)`` inline;
- PostgreSQL with a pool: ``fn`` in a worker thread
  (``trio.to_thread.run_sync``) under a :class:`trio.CapacityLimiter` of the
  pool's size, with a pool connection bound to that thread for the whole call
  (pg.PgConnection.bound), so a method's several statements and its
  transaction run on one connection, unchanged. More callers than
  connections queue on the limiter; none fails for it.

What ``fn`` may do in the thread: database statements and pure computation
on its arguments. It must not touch trio objects or state the trio thread
also uses (the event hub's watchers, fleet links, caches): a method that does
both is split, the database part run here and the rest on the trio thread
after it returns. db.WriteBehind is the one shared object made thread-safe
(its own locks), because every read flushes it.

Cancellation: the thread is not abandoned when the caller is cancelled (trio's
default), so a write is never left half-done behind a caller that moved on
(a report acknowledged as durable, a transaction still open); each statement
is bounded by pg.STATEMENT_TIMEOUT_MS instead. The call returns its result
as usual and the caller's cancellation takes effect at its next checkpoint.
Reads are not abandoned either: an abandoned thread would keep its pool
connection anyway, and a read is as bounded as a write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from . import pg
from .db import Connection

T = TypeVar("T")


class DbCalls:
    """Runs store methods inline (SQLite) or in pool threads (PostgreSQL)."""

    def __init__(self, conn: Connection) -> None:
        self._pg = conn if isinstance(conn, pg.PgConnection) and conn.pool_size > 0 else None
        #: True when calls leave the trio thread
        self.threaded = self._pg is not None
        size = self._pg.pool_size if self._pg is not None else 1
        #: one token per pool connection: a caller past it waits here, not in
        #: the pool (whose wait is bounded and would fail the call)
        self.limiter = trio.CapacityLimiter(size)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, in a worker thread on a pool connection when threaded.

        Raises whatever ``fn`` raises; pg.PgUnavailable when no pool
        connection could be had (PostgreSQL down).
        """
        if self._pg is None:
            return fn(*args)
        return await trio.to_thread.run_sync(self._bound, fn, args, limiter=self.limiter)

    def _bound(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        assert self._pg is not None
        with self._pg.bound():
            return fn(*args)
