"""The releaser's SQLite database: schema, connection settings, transactions.

One file, ``<data_dir>/fleetpush.db``, in WAL mode so a ``fleetpush release
publish`` in another process can write while the server reads and writes.

Threading rule: a :class:`sqlite3.Connection` is used by the thread that
opened it only. The server keeps one connection on the trio thread (every
query is small and indexed); publishing opens its own. ``busy_timeout`` makes a
writer wait briefly for another process's transaction instead of failing.
"""

from __future__ import annotations

import itertools
import json
import operator
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from .errors import ServerError

DB_NAME: Final = "fleetpush.db"
SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 5000

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    notes TEXT NOT NULL,
    size INTEGER NOT NULL,
    files INTEGER NOT NULL,
    restart INTEGER NOT NULL,
    min_version TEXT,
    expires INTEGER,
    manifest BLOB NOT NULL,      -- the exact signed bytes
    signatures BLOB NOT NULL,    -- msgpack list of {keyid, sig}
    dir TEXT NOT NULL,           -- relative to the data dir
    PRIMARY KEY (app, version),
    UNIQUE (app, sequence)
);
CREATE TABLE IF NOT EXISTS release_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    old_status TEXT,
    new_status TEXT NOT NULL,
    time REAL NOT NULL,
    operator TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    enrollment TEXT NOT NULL,
    app TEXT,
    version TEXT,
    channel TEXT,
    grp TEXT,
    sequence INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'idle',
    staged_version TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_result TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    app_status TEXT
);
CREATE INDEX IF NOT EXISTS devices_app ON devices (app, grp);
CREATE TABLE IF NOT EXISTS pushes (
    push_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    operator TEXT NOT NULL,
    app TEXT NOT NULL,
    version TEXT NOT NULL,
    mode TEXT NOT NULL,
    restart INTEGER NOT NULL,
    selector TEXT NOT NULL       -- JSON: how the targets were named
);
CREATE TABLE IF NOT EXISTS push_targets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    push_id TEXT NOT NULL REFERENCES pushes (push_id),
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,         -- queued, sent, accepted, refused, error, timeout, superseded
    detail TEXT NOT NULL DEFAULT '',
    result TEXT,                 -- last update_progress state reported for this push
    updated REAL NOT NULL,
    UNIQUE (push_id, device_id)
);
CREATE INDEX IF NOT EXISTS push_targets_device ON push_targets (device_id, state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    device_id TEXT,
    data TEXT NOT NULL
);
"""


class DatabaseError(ServerError):
    """The database could not be opened or a statement failed."""


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


def open_database(data_dir: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database in ``data_dir``.

    Autocommit mode: every statement commits on its own unless inside
    :func:`transaction`. Raises :class:`DatabaseError`.
    """
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            db_path(data_dir), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a commit is durable once checkpointed and never corrupt;
        # a power cut may lose the last few progress events, not a release row.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        with transaction(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
    except (sqlite3.Error, OSError) as e:
        raise DatabaseError(f"cannot open the database in {data_dir}: {e}") from e
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class WriteBehind:
    """Writes queued on the trio thread and committed together, in order.

    Per-event writes (delivery acks, progress, history rows) would otherwise
    cost one commit each: with 1000 devices answering a push at once, those
    commits, not the network, would set the latency. Queued statements are
    written in one transaction by :meth:`flush`, which the server calls every
    ``FLUSH_INTERVAL`` seconds, whenever ``max_pending`` accumulate, before
    every read that must see them, and at shutdown.
    """

    def __init__(self, conn: sqlite3.Connection, max_pending: int = 1000) -> None:
        self.conn = conn
        self.max_pending = max_pending
        self._pending: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, sql: str, params: tuple[Any, ...]) -> None:
        self._pending.append((sql, params))
        if len(self._pending) >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        with transaction(self.conn):
            # Runs of one statement (a push's 1000 acks, 1000 event rows) go
            # through executemany: same order, one statement lookup per run.
            for sql, run in itertools.groupby(pending, key=operator.itemgetter(0)):
                self.conn.executemany(sql, [params for _, params in run])

    def __len__(self) -> int:
        return len(self._pending)


FLUSH_INTERVAL: Final = 0.1


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=_default)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
