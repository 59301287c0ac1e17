"""server/gc_policy.py: sessions are frozen in batches and closed ones still get freed;
freed memory and SQLite's page cache go back to the system."""

from __future__ import annotations

import ctypes
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from fleetpush.server import db
from fleetpush.server.gc_policy import (
    MIN_BATCH,
    POLICY,
    TRIM_INTERVAL,
    YOUNG_THRESHOLD,
    GcPolicy,
)
from fleetpush.server.services import Services


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_hooks_do_nothing_until_installed() -> None:
    policy = GcPolicy()
    frozen = gc.get_freeze_count()
    for _ in range(MIN_BATCH * 2):
        policy.connection_opened()
    assert gc.get_freeze_count() == frozen


@pytest.mark.usefixtures("restore_gc")
def test_closed_sessions_cycles_are_collected_after_a_freeze() -> None:
    policy = GcPolicy()
    policy.install()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    node = _Node()
    ref = weakref.ref(node)
    for _ in range(MIN_BATCH):  # a batch of sessions opened: their objects get frozen
        policy.connection_opened()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert ref() is not None, "a frozen cycle was collected (it should wait for the unfreeze)"
    for _ in range(MIN_BATCH):  # a quarter (at least a batch) closed: unfreeze, collect
        policy.connection_closed()
    assert ref() is None, "the closed session's cycle was never freed"


@pytest.mark.usefixtures("restore_gc")
def test_freed_memory_is_returned_after_closes_at_most_every_interval() -> None:
    from fleetpush.server.gc_policy import TRIM_INTERVAL

    policy = GcPolicy()
    policy.connection_closed()
    assert not policy.trim_due(100.0)  # not installed: the library never touches the process
    policy.install()
    assert not policy.trim_due(100.0)  # nothing closed since install
    policy.connection_closed()
    assert policy.trim_due(100.0)
    calls: list[int] = []
    policy._trim = lambda pad: calls.append(pad) or 1
    policy.trim(100.0)
    assert calls == [0]
    policy.connection_closed()
    assert not policy.trim_due(100.0 + TRIM_INTERVAL / 2)  # too soon
    assert policy.trim_due(100.0 + TRIM_INTERVAL)


def _sqlite_memory_used() -> int:
    """Bytes SQLite holds (``sqlite3_memory_used``) in the library this process loaded."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libsqlite3" in line}
    if not paths:
        pytest.skip("SQLite is not a shared library here: its memory cannot be read")
    lib = ctypes.CDLL(paths.pop())
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


def test_release_memory_empties_the_sqlite_page_cache(tmp_path: Path) -> None:
    """After a 5-minute live fuzz campaign the page cache held 2 of the 5 MB the
    releaser kept (56,801 events, a 6 MB database); issue 10."""
    conn = db.open_database(tmp_path / "data")
    try:
        with db.transaction(conn):
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                ((f"k{i}", "v" * 200) for i in range(20_000)),
            )
        conn.execute("SELECT * FROM meta").fetchall()  # every page through the cache
        full = _sqlite_memory_used()
        assert full > 1_500_000, f"the page cache holds only {full} bytes"
        db.release_memory(conn)
        assert _sqlite_memory_used() < full // 4
    finally:
        conn.close()
    db.release_memory(conn)  # a closed connection: nothing to give back, no error


def test_the_trim_loop_empties_sqlite_s_cache_before_trimming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(db, "release_memory", lambda conn: calls.append("sqlite"))
    monkeypatch.setattr(POLICY, "trim_due", lambda now: True)
    monkeypatch.setattr(POLICY, "trim", lambda now: calls.append("malloc_trim"))
    fake = SimpleNamespace(conn=None)

    async def main() -> None:
        with trio.move_on_after(TRIM_INTERVAL * 2.5):
            await Services.trim_loop(fake)  # type: ignore[arg-type]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # the trim runs in a thread, so the mock clock may jump past the end after one round
    assert calls[:2] == ["sqlite", "malloc_trim"]
