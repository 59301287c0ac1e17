"""The releaser's state on PostgreSQL (server/pg.py, server/db.py; issue 15, part 1).

A real PostgreSQL (tests/support/fp_pg.py): the schema is created once, under
an advisory lock, the same migration list runs, a newer schema is refused,
and the stores' SQL runs unchanged through the dialect translation.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from fleetpush.server import db, pg


def _meta_schema(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    assert row is not None
    return str(row[0])


def test_a_new_database_is_at_the_newest_schema(pg_url: str, tmp_path: Path) -> None:
    conn = db.open_database(tmp_path, pg_url)
    try:
        assert db.get_meta(conn, "schema") == str(db.SCHEMA_VERSION)
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
        assert [r["version"] for r in rows] == [db.SCHEMA_VERSION]
    finally:
        conn.close()
    # Opening again creates nothing twice.
    db.open_database(tmp_path, pg_url).close()
    # PostgreSQL mode leaves no SQLite file behind.
    assert not db.db_path(tmp_path).exists()


def test_schema_1_gains_state_error_and_keeps_its_rows(pg_url: str, tmp_path: Path) -> None:
    db.open_database(tmp_path, pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute(
            "INSERT INTO devices (device_id, public_key, enrollment, first_seen, last_seen, state)"
            " VALUES ('dev-1', '\\x00', 'accepted', 1, 1, 'staged')"
        )
        raw.execute("ALTER TABLE devices DROP COLUMN state_error")
        raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
        raw.execute("DELETE FROM schema_version")
    conn = db.open_database(tmp_path, pg_url)
    try:
        row = conn.execute("SELECT state, state_error FROM devices").fetchone()
        assert tuple(row) == ("staged", None)
        assert db.get_meta(conn, "schema") == "2"
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
        assert versions == [2]
    finally:
        conn.close()


def test_a_newer_database_is_refused_and_left_alone(pg_url: str, tmp_path: Path) -> None:
    db.open_database(tmp_path, pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    with pytest.raises(db.DatabaseError, match="schema 3, newer than this releaser's 2"):
        db.open_database(tmp_path, pg_url)
    assert _meta_schema(pg_url) == "3"


def test_two_releasers_creating_the_schema_at_once_both_open_it(
    pg_url: str, tmp_path: Path
) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            db.open_database(tmp_path, pg_url).close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert _meta_schema(pg_url) == str(db.SCHEMA_VERSION)


def test_rows_read_by_index_and_by_name_and_bools_stored_as_integers(
    pg_url: str, tmp_path: Path
) -> None:
    conn = db.open_database(tmp_path, pg_url)
    try:
        conn.execute(
            "INSERT INTO pushes (push_id, created, operator, app, version, mode, restart, selector)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("p-1", 1.5, "op", "app", "1.0", "now", True, "{}"),
        )
        row = conn.execute("SELECT push_id, restart FROM pushes").fetchone()
        assert (row[0], row["restart"], row.keys()) == ("p-1", 1, ["push_id", "restart"])
        # A literal % and a ? inside quotes are not placeholders.
        row = conn.execute("SELECT '50%?' AS t, ? AS u", ("x",)).fetchone()
        assert tuple(row) == ("50%?", "x")
    finally:
        conn.close()


def test_a_bad_row_and_an_unreachable_database_are_told_apart(pg_url: str, tmp_path: Path) -> None:
    conn = db.open_database(tmp_path, pg_url)
    try:
        with pytest.raises(pg.PgRowError):
            conn.execute("INSERT INTO meta (key, value) VALUES (?, NULL)", ("k",))
        writer = db.WriteBehind(conn)
        writer.add("INSERT INTO meta (key, value) VALUES (?, ?)", ("good", "1"))
        writer.add("INSERT INTO meta (key, value) VALUES (?, ?)", ("bad", None))
        writer.flush()
        assert (writer.dropped, db.get_meta(conn, "good")) == (1, "1")
    finally:
        conn.close()
    with pytest.raises(db.DatabaseError, match="cannot open the database"):
        db.open_database(tmp_path, "postgresql://nobody@127.0.0.1:1/none")


def test_the_url_recorded_in_the_data_dir_is_used_by_other_processes(
    pg_url: str, tmp_path: Path
) -> None:
    db.record_database(tmp_path, pg_url)
    assert (tmp_path / db.DATABASE_FILE).stat().st_mode & 0o077 == 0
    conn = db.open_database(tmp_path)  # e.g. fleetpush release publish --data-dir
    try:
        assert isinstance(conn, pg.PgConnection)
    finally:
        conn.close()
    db.record_database(tmp_path, None)
    assert db.recorded_database(tmp_path) is None


def test_the_schema_translates_to_postgresql() -> None:
    statements = pg.pg_schema(db.SCHEMA)
    text = "\n".join(statements)
    for sqlite_only in ("AUTOINCREMENT", "BLOB", " REAL", "json_extract"):
        assert sqlite_only not in text
    assert pg.translate("SELECT * FROM events INDEXED BY events_push WHERE x = ?") == (
        "SELECT * FROM events WHERE x = %s"
    )
    assert pg.translate("BEGIN IMMEDIATE") == "BEGIN"


def test_a_lost_connection_is_reopened_by_a_later_call(pg_url: str, tmp_path: Path) -> None:
    conn = db.open_database(tmp_path, pg_url)
    try:
        assert isinstance(conn, pg.PgConnection)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(pg.PgUnavailable):
            conn.execute("SELECT 1")
        # The next call reconnects (no backoff yet: the first reconnect is immediate).
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    finally:
        conn.close()


def test_transactions_take_turns_across_connections_as_on_sqlite(
    pg_url: str, tmp_path: Path
) -> None:
    # BEGIN IMMEDIATE keeps SQLite's one writer at a time across processes:
    # a second transaction starts only once the first committed, so a
    # read-then-write (the next release sequence) cannot interleave.
    first = db.open_database(tmp_path, pg_url)
    second = db.open_database(tmp_path, pg_url)
    order: list[str] = []
    started = threading.Event()

    def other() -> None:
        started.set()
        with db.transaction(second):
            order.append("second began")
            value = int(db.get_meta(second, "n") or 0)
            db.set_meta(second, "n", str(value + 1))

    try:
        with db.transaction(first):
            value = int(db.get_meta(first, "n") or 0)
            thread = threading.Thread(target=other)
            thread.start()
            assert started.wait(10)
            db.set_meta(first, "n", str(value + 1))
            order.append("first commits")
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert order == ["first commits", "second began"]
        assert db.get_meta(first, "n") == "2"
    finally:
        first.close()
        second.close()
