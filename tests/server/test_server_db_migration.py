"""The releaser's database migrates forward and refuses a newer one (server/db.py).

Schema 2 (issue 12) adds ``devices.state_error``: why a device is deferred.
A schema-1 database is built as the releaser before it wrote one: the
current schema without that column (nor the schema_version table of issue
15), meta ``schema = 1``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fleetpush.server import db


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [str(r[1]) for r in conn.execute("PRAGMA table_info(devices)")]


def _schema_1(data_dir: Path) -> None:
    conn = db.open_database(data_dir)
    conn.execute(
        "INSERT INTO devices (device_id, public_key, enrollment, first_seen, last_seen, state)"
        " VALUES ('dev-1', x'00', 'accepted', 1, 1, 'staged')"
    )
    conn.execute("ALTER TABLE devices DROP COLUMN state_error")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.execute("DROP TABLE schema_version")  # issue 15 added it
    conn.close()


def test_a_new_database_is_at_the_newest_schema(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    assert "state_error" in _columns(conn)
    assert db.get_meta(conn, "schema") == str(db.SCHEMA_VERSION) == "2"


def test_schema_1_gains_state_error_and_keeps_its_rows(tmp_path: Path) -> None:
    _schema_1(tmp_path)
    conn = db.open_database(tmp_path)
    assert "state_error" in _columns(conn)
    assert db.get_meta(conn, "schema") == "2"
    row = conn.execute("SELECT state, state_error FROM devices").fetchone()
    assert tuple(row) == ("staged", None)
    conn.close()
    # Opening again migrates nothing twice (ALTER TABLE would fail on a second run).
    db.open_database(tmp_path).close()


def test_a_newer_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    conn.close()
    with pytest.raises(db.DatabaseError, match="schema 3, newer than this releaser's 2"):
        db.open_database(tmp_path)
    conn = sqlite3.connect(db.db_path(tmp_path))
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
    conn.close()


def test_schema_version_logs_each_applied_version(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [2]
    conn.close()
    _schema_1(tmp_path)
    conn = db.open_database(tmp_path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [2]
    conn.close()
