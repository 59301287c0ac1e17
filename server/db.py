"""The releaser's SQLite database: schema, connection settings, transactions.

One file, ``<data_dir>/fleetpush.db``, in WAL mode so a ``fleetpush release
publish`` in another process can write while the server reads and writes.

Threading rule: a :class:`sqlite3.Connection` is used by the thread that
opened it only. The server keeps one connection on the trio thread (every
query is small and indexed, microseconds in-process); publishing opens its
own. On PostgreSQL, where a round trip is 0.1 ms on loopback and more on a
network, the releaser's hot paths leave the trio thread through
server/db_calls.py, each call on a pool connection (server/pg.py). ``busy_timeout`` makes a
writer wait briefly for another process's transaction instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from . import pg
from .errors import ServerError
from .schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Iterable

DB_NAME: Final = "fleetpush.db"
BUSY_TIMEOUT_MS: Final = 5000

log = logging.getLogger("fleetpush.server")


class Cursor(Protocol):
    """What the stores use of a statement's result (sqlite3.Cursor, pg.PgCursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The storage interface every store goes through (issue 15, part 1).

    Two backends: :class:`sqlite3.Connection` (the default, one file in the
    data dir) and :class:`pg.PgConnection` (``--database postgresql://...``),
    which runs the same SQL (server/pg.py translates the dialect). Rows read
    by index and by column name on both.
    """

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, seq: Iterable[Any], /) -> Cursor: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


#: A row of either backend (sqlite3.Row or pg.PgRow: both index and name).
Row: TypeAlias = Any


class DatabaseError(ServerError):
    """The database could not be opened or a statement failed."""


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


#: In a data dir whose releaser runs on PostgreSQL: the database URL, so
#: ``fleetpush release publish --data-dir D`` (another process) writes its
#: release rows to the same database without being told (issue 15).
DATABASE_FILE: Final = "database.url"
#: The environment variable naming the database when no option does.
DATABASE_ENV: Final = "FLEETPUSH_DATABASE"


def recorded_database(data_dir: Path) -> str | None:
    """The database URL recorded in ``data_dir``, or None (SQLite)."""
    try:
        text = (Path(data_dir) / DATABASE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DatabaseError(f"cannot read {Path(data_dir) / DATABASE_FILE}: {e}") from e
    return text or None


def record_database(data_dir: Path, database: str | None) -> None:
    """Record (or with None, forget) the releaser's database URL in ``data_dir``.

    Mode 0600: the URL may carry a password. Raises DatabaseError.
    """
    path = Path(data_dir) / DATABASE_FILE
    try:
        path.parent.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
        if database is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(database + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise DatabaseError(f"cannot record the database URL in {path}: {e}") from e


def open_database(data_dir: Path, database: str | None = None, pool_size: int = 0) -> Connection:
    """Open (creating if needed) the releaser's database.

    ``database``: a ``postgresql://`` URL names that PostgreSQL database
    (server/pg.py); None falls back to ``$FLEETPUSH_DATABASE``, then to the
    URL recorded in ``data_dir`` (:func:`record_database`), then to the SQLite
    file in ``data_dir``. Autocommit
    mode: every statement commits on its own unless inside
    :func:`transaction`. ``pool_size``: PostgreSQL connections for worker
    threads (server/db_calls.py); ignored for SQLite. Raises :class:`DatabaseError`.
    """
    data_dir = Path(data_dir)
    database = database or os.environ.get(DATABASE_ENV) or recorded_database(data_dir)
    if database is not None and pg.is_postgres_url(database):
        return _open_postgres(database, pool_size)
    try:
        secure_data_dir(data_dir)
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
            _migrate(conn, str(data_dir), lambda sql: [sql])
    except DatabaseError:
        conn.close()
        raise
    except (sqlite3.Error, OSError) as e:
        raise DatabaseError(f"cannot open the database in {data_dir}: {e}") from e
    return conn


def _open_postgres(url: str, pool_size: int = 0) -> Connection:
    """Open a PostgreSQL database, creating or migrating its schema.

    The schema is created and migrated in one transaction under an advisory
    lock, so two releasers starting at once against an empty database do not
    both create it: the second waits, then finds it done. Raises DatabaseError.
    """
    where = pg.redact(url)
    try:
        conn = pg.PgConnection(url, pool_size)
    except pg.PgError as e:
        raise DatabaseError(f"cannot open the database {where}: {e}") from e
    try:
        with transaction(conn):
            conn.execute("SELECT pg_advisory_xact_lock(?)", (pg.SCHEMA_LOCK_KEY,))
            for statement in pg.pg_schema(SCHEMA):
                conn.execute(statement)
            _migrate(conn, where, pg.pg_schema)
    except DatabaseError:
        conn.close()
        raise
    except pg.PgError as e:
        conn.close()
        raise DatabaseError(f"cannot open the database {where}: {e}") from e
    return conn


def _migrate(conn: Connection, where: str, dialect: Callable[[str], list[str]]) -> None:
    """Bring an older database up to :data:`SCHEMA_VERSION` (inside the opening
    transaction, so a failed step changes nothing). Raises DatabaseError for a
    database newer than this releaser, sqlite3.Error for a failed step."""
    # A database without the row is new (SCHEMA above is the newest already).
    # ``dialect`` turns a migration statement into the backend's statements.
    now = time.time()
    created = conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT (key) DO NOTHING",
        (str(SCHEMA_VERSION),),
    ).rowcount
    if created:
        conn.execute(
            "INSERT INTO schema_version (version, applied) VALUES (?, ?)"
            " ON CONFLICT (version) DO NOTHING",
            (SCHEMA_VERSION, now),
        )
        return
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    found = int(row[0]) if row is not None and str(row[0]).isdigit() else 1
    if found > SCHEMA_VERSION:
        raise DatabaseError(
            f"cannot open the database {where}: it is at schema {found}, newer than "
            f"this releaser's {SCHEMA_VERSION} [run the fleetpush that wrote it, or a newer one]"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS.get(version, ()):
            for translated in dialect(statement):
                conn.execute(translated)
        conn.execute(
            "INSERT INTO schema_version (version, applied) VALUES (?, ?)"
            " ON CONFLICT (version) DO NOTHING",
            (version, now),
        )
        log.info("database %s migrated to schema %d", where, version)
    if found != SCHEMA_VERSION:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))


#: Modes of the data dir and of the database files (issue 10, item 15): the
#: registry holds the fleet inventory and the devices' log tails.
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600


def release_memory(conn: Connection) -> None:
    """Empty SQLite's page cache of ``conn`` (``PRAGMA shrink_memory``); never raises.

    The cache (up to 2 MB, SQLite's default ``cache_size``) fills as the event
    history grows, and stays full after the burst that grew it: 2 of the 5 MB
    the releaser still held after a 5-minute live fuzz campaign (issue 10).
    Emptying it takes ~0.2 ms; pages read again come from the OS page cache.
    """
    try:
        conn.execute("PRAGMA shrink_memory")
    except ERRORS as e:  # e.g. closed: nothing to give back
        log.debug("PRAGMA shrink_memory failed: %s", e)


def secure_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` 0700 and the database 0600, or tighten them (logged).

    A data dir or database file that others can read (the default umask made
    them 0755/0644) is fixed with ``chmod`` and a warning rather than refused,
    so an existing releaser keeps starting after an upgrade; one this user
    cannot chmod (another owner) is refused. SQLite creates the -wal and -shm
    files with the database's own mode. Raises OSError (with the path).
    """
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=DIR_MODE)
    _tighten(data_dir, DIR_MODE)
    path = db_path(data_dir)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if f.exists():
            _tighten(f, FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` if group or others have any access; raises OSError."""
    current = stat.S_IMODE(path.stat().st_mode)
    if current & 0o077:
        os.chmod(path, mode)
        log.warning(
            "%s was readable by others (mode %o): changed to %o (issue 10, item 15)",
            path,
            current,
            mode,
        )


@contextmanager
def transaction(conn: Connection, *, exclusive: bool = True) -> Iterator[Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.

    ``exclusive=False``: plain ``BEGIN``, for a transaction whose every
    statement touches one device's rows and whose first statement writes (so
    SQLite takes its write lock there, waiting out the busy timeout): on
    PostgreSQL it then does not take the advisory write lock (server/pg.py)
    that serialises every other transaction, and several such transactions
    run at once on the pool's connections (server/db_calls.py).
    Raises whatever the body or the commit raised (``sqlite3.Error`` and
    friends), never an error of the rollback itself.
    """
    conn.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite rolls a transaction back by itself on some errors (SQLITE_FULL,
        # SQLITE_IOERR, SQLITE_NOMEM, a failed COMMIT): a second ROLLBACK then
        # fails with "no transaction is active" and would hide the real error.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except (sqlite3.Error, pg.PgError):
                log.exception("rolling back after a failed statement failed too")
        raise


#: Errors a statement raises because of the values bound to it: the row is
#: bad and will never be written, whatever else is in the batch. (A u64 past
#: 2**63 raises OverflowError, a value of a type SQLite cannot store raises
#: InterfaceError/ProgrammingError, a broken constraint IntegrityError.)
ROW_ERRORS: Final = (
    OverflowError,
    ValueError,
    TypeError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    pg.PgRowError,
)

#: What a statement raises on either backend (besides ROW_ERRORS).
ERRORS: Final = (sqlite3.Error, pg.PgError)

#: Rows kept queued while the database itself refuses writes (locked past the
#: busy timeout, disk full, I/O error), in multiples of ``max_pending``; past
#: this the oldest are dropped and counted so memory stays bounded.
MAX_BACKLOG_FACTOR: Final = 10


class WriteBehind:
    """Writes queued on the trio thread and committed together, in order.

    Per-event writes (delivery acks, progress, history rows) would otherwise
    cost one commit each: with 1000 devices answering a push at once, those
    commits, not the network, would set the latency. Queued statements are
    written in one transaction by :meth:`flush`, which the server calls every
    ``FLUSH_INTERVAL`` seconds, whenever ``max_pending`` accumulate, before
    every read that must see them, and at shutdown.

    Isolation (issue 10, item 1; specs/THREATS.md "one bad integer"): rows come
    from many devices, so one row must never cost the others their writes, and
    reads flush first, so a write that fails must never fail the read. When a
    batch fails, :meth:`flush` writes it again row by row: a row that fails for
    its own values (:data:`ROW_ERRORS`) is dropped and logged, every other row
    is committed. When the database refuses writes as such
    (``sqlite3.OperationalError``, e.g. disk full) the rows stay queued for the
    next flush. :meth:`flush` never raises for either; ``dropped`` and
    ``last_error`` say what happened.

    Threads (server/db_calls.py): on PostgreSQL :meth:`flush` runs in a
    worker thread while the trio thread keeps calling :meth:`add`. ``_lock``
    guards the queue (held for list operations only, never for I/O);
    ``_flushing`` lets one flush write at a time, so batches commit in the
    order they were queued, a read's flush waits for the one in progress
    (the read then sees every row queued before it), and rows a failed flush
    keeps go back in front of those added meanwhile. ``inline_flush=False``
    (the threaded mode): :meth:`add` never writes on the caller's thread; the
    flush loop and the reads do.
    """

    def __init__(
        self, conn: Connection, max_pending: int = 1000, *, inline_flush: bool = True
    ) -> None:
        self.conn = conn
        self.max_pending = max_pending
        self.inline_flush = inline_flush
        self._lock = threading.Lock()
        self._flushing = threading.RLock()
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        #: rows ever added, and how many of the first ones a finished flush
        #: has dealt with (written, or dropped as bad): a flush whose rows an
        #: earlier one already covered returns at once (see flush)
        self._added = 0
        self._done = 0
        #: rows given up on (bad values, or backlog overflow) since start
        self.dropped = 0
        #: the last write error, or None once a flush wrote everything
        self.last_error: str | None = None
        #: statements whose rows commute with every other queued row but the
        #: ``barriers`` (the event history's INSERT: its key is a seq given out
        #: in advance; its prune DELETE is a barrier), so a batch may hold them
        #: back until the next barrier or its end. Without this a push's acks
        #: queue UPDATE, INSERT, UPDATE, INSERT...: runs of one row, one
        #: executemany each; with it, one UPDATE executemany and one INSERT
        #: executemany per flush (issue 15, specs/SCALE.md §2).
        self.commuting: set[str] = set()
        self.barriers: set[str] = set()

    def add(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            self._pending.append((sql, params))
            self._added += 1
            full = len(self._pending) % self.max_pending == 0
        # Every max_pending rows, not on every add: while the database refuses
        # writes, each try may wait out the busy timeout.
        if full and self.inline_flush:
            self.flush()

    def flush(self) -> None:
        """Commit every queued row that can be written.

        Never raises because of the rows or the database refusing writes (see
        the class docstring). Concurrent callers (reads and reports in worker
        threads, server/db_calls.py) share flushes: one that waited for the
        flush in progress returns at once if that flush took every row queued
        before this call, instead of writing the rows queued since (one flush
        per waiting caller made every report wait for several in a row).
        """
        with self._lock:
            target = self._added
        with self._flushing:
            with self._lock:
                if self._done >= target or not self._pending:
                    return
                pending, self._pending = self._pending, []
                taken = self._added
            try:
                self._write_batch(pending)
            except (*ROW_ERRORS, *ERRORS) as e:
                if _database_refuses(e):
                    self._keep(pending, e)
                    return
                if self._write_rows(pending):
                    self._done = taken
                return
            except BaseException as e:
                # Interrupted (KeyboardInterrupt, a bug): nothing of the batch
                # is committed (its transaction rolled back), so keep it all.
                self._keep(pending, e)
                raise
            self._done = taken
            self.last_error = None

    def _write_batch(self, pending: list[tuple[str, tuple[Any, ...]]]) -> None:
        with transaction(self.conn):
            for sql, rows in self._runs(pending):
                self.conn.executemany(sql, rows)

    def _runs(
        self, pending: list[tuple[str, tuple[Any, ...]]]
    ) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """``pending`` as runs of one statement each, for one executemany per run.

        Rows keep their order, except those of :attr:`commuting` statements,
        which are held back to the next barrier (or the end), each statement's
        in queue order: the same transaction either way, so a reader sees all
        of the batch or none of it.
        """
        runs: list[tuple[str, list[tuple[Any, ...]]]] = []
        held: dict[str, list[tuple[Any, ...]]] = {}
        commuting, barriers = self.commuting, self.barriers
        for sql, params in pending:
            if sql in commuting:
                held.setdefault(sql, []).append(params)
                continue
            if held and sql in barriers:
                runs.extend(held.items())
                held = {}
            if runs and runs[-1][0] == sql:
                runs[-1][1].append(params)
            else:
                runs.append((sql, [params]))
        runs.extend(held.items())
        return runs

    def _write_rows(self, pending: list[tuple[str, tuple[Any, ...]]]) -> bool:
        # The slow path, taken only after a batch failed: one savepoint per row
        # inside one transaction, so a bad row is undone alone and the good
        # rows still cost a single commit.
        bad: list[str] = []
        try:
            with transaction(self.conn):
                for sql, params in pending:
                    self.conn.execute("SAVEPOINT queued_row")
                    try:
                        self.conn.execute(sql, params)
                    except (*ROW_ERRORS, *ERRORS) as e:
                        if _database_refuses(e):
                            raise
                        self.conn.execute("ROLLBACK TO queued_row")
                        bad.append(f"{' '.join(sql.split()[:3])} {_short(params)}: {e}")
                    self.conn.execute("RELEASE queued_row")
        except ERRORS as e:
            self._keep(pending, e)
            return False
        self.dropped += len(bad)
        for reason in bad:
            log.error("dropped a queued database row: %s", reason)
        self.last_error = bad[-1] if bad else None
        return True

    def _keep(self, pending: list[tuple[str, tuple[Any, ...]]], error: BaseException) -> None:
        # The database refuses writes (locked, full, I/O error): keep the rows
        # for the next flush, in order (before any added meanwhile), up to a bound.
        with self._lock:
            self._pending[:0] = pending
            backlog = MAX_BACKLOG_FACTOR * self.max_pending
            lost = max(0, len(self._pending) - backlog)
            del self._pending[:lost]
        if lost:
            self.dropped += lost
            log.error("dropped %d queued database rows: the backlog is full", lost)
        self.last_error = str(error)
        log.error("writing %d queued database rows failed, kept: %s", len(pending), error)

    def __len__(self) -> int:
        return len(self._pending)


def _database_refuses(error: BaseException) -> bool:
    """True when ``error`` is about the database (full, locked, I/O), not a row."""
    if isinstance(error, pg.PgUnavailable):
        return True
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    if isinstance(error, ROW_ERRORS):
        return False
    name = getattr(error, "sqlite_errorname", "")
    return any(name == c or name.startswith(c + "_") for c in _DATABASE_ERRORS)


#: SQLite result codes that say the database as a whole refuses writes.
_DATABASE_ERRORS: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_NOMEM",
    "SQLITE_CORRUPT",
    "SQLITE_NOTADB",
    "SQLITE_PROTOCOL",
)


def _short(params: tuple[Any, ...]) -> str:
    text = repr(params)
    return text if len(text) <= 120 else text[:117] + "..."


FLUSH_INTERVAL: Final = 0.1


def get_meta(conn: Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: Connection, key: str, value: str) -> None:
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
