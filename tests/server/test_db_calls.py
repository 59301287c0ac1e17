"""Database calls off the trio thread (server/db_calls.py, server/pg.py's pool; issue 15).

On a real PostgreSQL (tests/support/fp_pg.py): a call runs in a worker
thread on a pool connection, more calls than connections queue on the
limiter, a flush keeps the rows queued meanwhile (and their order), a
connection killed in the middle of a flush loses no row, and a cancelled
caller does not abandon its write. On SQLite the call stays inline.

A flush or a write is made to wait, without timing, by holding the
transaction write lock (pg.WRITE_LOCK_KEY) from another connection: every
``BEGIN IMMEDIATE`` takes it (server/pg.py).
"""

from __future__ import annotations

import inspect
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from fleetpush.server import db, pg
from fleetpush.server.db_calls import DbCalls

UPSERT = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
EVENT = "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, 0, 'test', NULL, '{}')"


@pytest.fixture
def conn(pg_url: str, tmp_path: Path) -> Iterator[db.Connection]:
    c = db.open_database(tmp_path, pg_url, pool_size=2)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def admin(pg_url: str) -> Iterator[Any]:
    with psycopg.connect(pg_url, autocommit=True) as c:
        yield c


async def _wait_for_lock_waiter(admin: Any) -> int:
    """The pid of the backend waiting for the write lock (polls pg_stat_activity)."""
    with trio.fail_after(10):
        while True:
            # Inside the admin's transaction the statistics view is a snapshot.
            admin.execute("SELECT pg_stat_clear_snapshot()")
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%pg_advisory_xact_lock%' AND datname = current_database()"
            ).fetchone()
            if row is not None:
                return int(row[0])
            await trio.sleep(0.01)


async def _wait_for_a_flush_waiting_its_turn() -> None:
    """Until a thread is inside WriteBehind.flush waiting for the one in progress
    (its frame stands at the ``with self._flushing`` line: it has read its target)."""
    code = db.WriteBehind.flush.__code__
    source, first = inspect.getsourcelines(db.WriteBehind.flush)
    line = first + next(i for i, text in enumerate(source) if "with self._flushing" in text)
    with trio.fail_after(10):
        while True:
            for frame in sys._current_frames().values():
                f: types.FrameType | None = frame
                while f is not None:
                    if f.f_code is code and f.f_lineno == line:
                        return
                    f = f.f_back
            await trio.sleep(0.005)


def _value(admin: Any, key: str) -> str | None:
    row = admin.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


async def test_a_call_runs_in_a_worker_thread_on_a_pool_connection(
    conn: db.Connection,
) -> None:
    calls = DbCalls(conn)
    assert calls.threaded
    assert isinstance(conn, pg.PgConnection)

    def where() -> tuple[int, int]:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return threading.get_ident(), int(pid)

    before = conn.loop_calls
    with trio.fail_after(20):
        thread, pid = await calls.run(where)
    loop_pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    assert thread != threading.get_ident()
    assert pid != loop_pid  # not the trio thread's dedicated connection
    assert conn.loop_calls == before + 1  # only the check above ran on the trio thread


async def test_more_calls_than_connections_queue_rather_than_fail(
    conn: db.Connection, admin: Any
) -> None:
    """Ten calls on a pool of two: all succeed, at most two at once."""
    calls = DbCalls(conn)
    running, most, lock = 0, 0, threading.Lock()

    def slow_read(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            # Each waits for the write lock the test holds, so all ten are
            # outstanding at once before any finishes.
            with db.transaction(conn):
                return int(conn.execute("SELECT ?", (i,)).fetchone()[0])
        finally:
            with lock:
                running -= 1

    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await calls.run(slow_read, i))

    admin.execute("BEGIN")
    admin.execute("SELECT pg_advisory_xact_lock(%s)", (pg.WRITE_LOCK_KEY,))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
            await _wait_for_lock_waiter(admin)
            await trio.testing.wait_all_tasks_blocked()
            assert calls.limiter.borrowed_tokens == 2
            assert calls.limiter.statistics().tasks_waiting == 8
            admin.execute("COMMIT")
    assert sorted(results) == list(range(10))
    assert most == 2


async def test_rows_added_during_a_flush_are_kept_and_written_after_it_in_order(
    conn: db.Connection, admin: Any
) -> None:
    calls = DbCalls(conn)
    writer = db.WriteBehind(conn, inline_flush=False)
    writer.add(UPSERT, ("order", "first"))
    writer.add(EVENT, (1,))
    admin.execute("BEGIN")
    admin.execute("SELECT pg_advisory_xact_lock(%s)", (pg.WRITE_LOCK_KEY,))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls.run, writer.flush)
            await _wait_for_lock_waiter(admin)
            # The flush holds the first two rows; these wait for the next one.
            writer.add(UPSERT, ("order", "second"))
            writer.add(EVENT, (2,))
            assert len(writer) == 2
            admin.execute("COMMIT")
        assert _value(admin, "order") == "first"
        await calls.run(writer.flush)
    assert _value(admin, "order") == "second"
    seqs = [r[0] for r in admin.execute("SELECT seq FROM events ORDER BY seq")]
    assert seqs == [1, 2]
    assert len(writer) == 0
    assert writer.last_error is None


async def test_a_connection_killed_mid_flush_keeps_the_rows_in_order_until_written(
    conn: db.Connection, admin: Any
) -> None:
    """The flush's backend is terminated while it waits inside its transaction
    (as PostgreSQL going away would): its rows go back in front of those added
    meanwhile, and the next flush, on a fresh pool connection, writes all."""
    calls = DbCalls(conn)
    writer = db.WriteBehind(conn, inline_flush=False)
    writer.add(UPSERT, ("order", "first"))
    writer.add(EVENT, (1,))
    admin.execute("BEGIN")
    admin.execute("SELECT pg_advisory_xact_lock(%s)", (pg.WRITE_LOCK_KEY,))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls.run, writer.flush)
            pid = await _wait_for_lock_waiter(admin)
            writer.add(UPSERT, ("order", "second"))
            writer.add(EVENT, (2,))
            # From another session: the admin one is inside its transaction.
            with psycopg.connect(admin.info.dsn, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        admin.execute("COMMIT")
        assert writer.last_error is not None
        assert len(writer) == 4  # nothing lost, nothing written
        assert _value(admin, "order") is None
        # The pool replaces the broken connection; the rows go in order.
        while len(writer):
            await calls.run(writer.flush)
            await trio.sleep(0.05)
    assert _value(admin, "order") == "second"
    assert [r[0] for r in admin.execute("SELECT seq FROM events ORDER BY seq")] == [1, 2]
    assert writer.dropped == 0


async def test_a_cancelled_caller_does_not_abandon_its_write(
    conn: db.Connection, admin: Any
) -> None:
    """The cancellation takes effect once the threaded transaction returned:
    the row is committed, and the caller sees Cancelled at its next checkpoint."""
    calls = DbCalls(conn)

    def write() -> None:
        with db.transaction(conn):
            conn.execute(UPSERT, ("cancelled", "written"))

    admin.execute("BEGIN")
    admin.execute("SELECT pg_advisory_xact_lock(%s)", (pg.WRITE_LOCK_KEY,))
    finished_call = False
    scope = trio.CancelScope()

    async def caller() -> None:
        nonlocal finished_call
        with scope:
            await calls.run(write)
            finished_call = True  # the call returned: the thread was not abandoned
            await trio.sleep(0)  # the cancellation takes effect here
            raise AssertionError("not cancelled")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await _wait_for_lock_waiter(admin)
            scope.cancel()
            # Still waiting in its thread: the cancel did not abandon it.
            await trio.testing.wait_all_tasks_blocked()
            assert calls.limiter.borrowed_tokens == 1
            assert _value(admin, "cancelled") is None
            admin.execute("COMMIT")
    assert scope.cancelled_caught
    assert finished_call
    assert _value(admin, "cancelled") == "written"


async def test_sqlite_calls_stay_on_the_trio_thread(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    try:
        calls = DbCalls(conn)
        assert not calls.threaded
        assert await calls.run(threading.get_ident) == threading.get_ident()
    finally:
        conn.close()


async def test_database_pool_0_keeps_calls_on_the_trio_thread(
    pg_url: str, tmp_path: Path
) -> None:
    """``database_pool = 0``: the measurement's "before" (scripts/loop_stall_bench.py)."""
    conn = db.open_database(tmp_path, pg_url, pool_size=0)
    try:
        calls = DbCalls(conn)
        assert not calls.threaded
        assert await calls.run(threading.get_ident) == threading.get_ident()
    finally:
        conn.close()


async def test_a_flush_waiting_for_one_that_took_its_rows_writes_nothing_more(
    conn: db.Connection, admin: Any
) -> None:
    """Flushes are shared: a caller that waited for the flush in progress returns
    once that flush wrote the rows queued before its call; rows queued after
    its call are left for the next one (a read needs only the older rows)."""
    calls = DbCalls(conn)
    writer = db.WriteBehind(conn, inline_flush=False)
    writer.add(EVENT, (1,))
    admin.execute("BEGIN")
    admin.execute("SELECT pg_advisory_xact_lock(%s)", (pg.WRITE_LOCK_KEY,))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls.run, writer.flush)  # takes row 1, then waits
            await _wait_for_lock_waiter(admin)
            nursery.start_soon(calls.run, writer.flush)  # needs row 1 only
            await _wait_for_a_flush_waiting_its_turn()
            writer.add(EVENT, (2,))  # after both calls
            admin.execute("COMMIT")
        assert [r[0] for r in admin.execute("SELECT seq FROM events")] == [1]
        assert len(writer) == 1
        await calls.run(writer.flush)  # a call after row 2: writes it
    assert [r[0] for r in admin.execute("SELECT seq FROM events ORDER BY seq")] == [1, 2]
