"""The releaser's PostgreSQL backend (issue 15, part 1: ``--database postgresql://...``).

:class:`PgConnection` gives the stores the same small surface they use of a
:class:`sqlite3.Connection` (``execute``, ``executemany``, ``in_transaction``,
``close``; rows readable by index and by column name), so every store runs
the same SQL on both backends. The SQL the stores write is the portable
subset (``ON CONFLICT ... DO NOTHING/UPDATE``, ``COALESCE``, ``LIMIT ?``);
what differs is translated here once per statement text (:func:`translate`):

- ``?`` placeholders become ``%s`` (and a literal ``%`` is doubled);
- ``BEGIN IMMEDIATE`` (SQLite's "take the database's write lock now")
  becomes ``BEGIN`` plus a transaction-scoped advisory lock
  (:data:`WRITE_LOCK_KEY`): the stores' read-then-write transactions (the
  next release sequence, a deployment's next phase) were written against
  SQLite's one-writer-at-a-time, and keep it across processes (a publisher
  and the releaser, or several releasers) without each store locking rows
  of its own. Single autocommit statements do not take it;
- ``json_extract(data, '$.key')`` becomes ``(data::jsonb ->> 'key')``, the
  same expression the PostgreSQL indexes are built on (:func:`pg_schema`);
- ``json_each(?)`` (a JSON array bound as text) becomes
  ``json_array_elements_text(?::json)``;
- ``INDEXED BY <index>`` (a SQLite planner hint) is dropped;
- ``PRAGMA ...`` is not sent at all.

The DDL is the SQLite schema of server/db.py translated by :func:`pg_schema`
(types, identity columns, expression indexes), so one schema text and one
migration list serve both backends.

Threading (issue 15, part 1; server/db_calls.py): a :class:`PgConnection`
holds one *dedicated* connection, used by the thread that opened it (the trio
thread, and a publisher's main thread), plus, when opened with
``pool_size > 0``, a ``psycopg_pool.ConnectionPool`` of that many. A worker
thread started by ``db_calls.DbCalls.run`` *binds* a pool connection for the
duration of one call (:meth:`PgConnection.bound`): every statement that thread
sends through this object, on any store, goes to the bound connection, so a
store method's statements and transaction run on one connection in one
thread, and the stores' SQL is unchanged. Calls from a thread with nothing
bound use the dedicated connection, as before the pool existed: the paths
not yet moved to the runner (rare operator commands, start-up, shutdown)
still block the trio thread for their round trips, and the hot ones (the
write-behind flush, handshakes, reports, operator listings, deploy show, the
P2P tracker) do not. ``tests/server/test_db_calls.py`` counts loop-thread
statements (:attr:`PgConnection.loop_calls`) on the paths that were moved.
A transaction on the dedicated connection and one on a pool connection
serialise on the advisory write lock, as two releasers do. A worker thread
that runs a store method without the runner (nothing bound) shares the
dedicated connection with the trio thread: psycopg serialises the statements,
not the transactions, so such code must go through the runner instead.
Connections idle in the pool when PostgreSQL restarts are found broken at
their next use: that call fails with :class:`PgUnavailable` (queued rows stay
queued) and the pool replaces the connection (no check per checkout: it would
cost a round trip on every call).

psycopg is imported only here, and this module only in PostgreSQL mode, so
``fleetpush server --data-dir D`` needs nothing else installed.

Errors: every psycopg exception is wrapped at this boundary (``raise ... from
e``) into :class:`PgRowError` (the row's own values are bad: never written,
whatever else is in a batch) or :class:`PgUnavailable` (the database refuses or
went away: rows queued by WriteBehind stay queued). After the connection
broke, the next call reconnects, at most once per backoff interval (doubling
to :data:`MAX_BACKOFF`), and says so in one log line.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from .errors import ServerError

log = logging.getLogger("fleetpush.server")

#: Each statement is bounded (a thread cannot be abandoned mid-statement);
#: the same bound as SQLite's busy timeout.
STATEMENT_TIMEOUT_MS: Final = 5000
CONNECT_TIMEOUT_S: Final = 5
MIN_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
#: Held while the schema is created or migrated, so two releasers starting at
#: once against an empty database do not both create it (an arbitrary
#: constant: "fpsh" in ASCII).
SCHEMA_LOCK_KEY: Final = 0x66707368
#: Held by every explicit transaction (see ``BEGIN IMMEDIATE`` above): "fpwr".
WRITE_LOCK_KEY: Final = 0x66707772


class PgError(ServerError):
    """A PostgreSQL statement failed (base of the two kinds below)."""


class PgRowError(PgError):
    """The statement failed because of the values bound to it."""


class PgUnavailable(PgError):
    """PostgreSQL refused the statement as such (down, timed out, read-only...)."""


def is_postgres_url(database: str | None) -> bool:
    return database is not None and database.startswith(("postgresql://", "postgres://"))


# --- SQL translation -------------------------------------------------------------

_JSON = re.compile(r"json_extract\(\s*(\w+)\s*,\s*'\$\.(\w+)'\s*\)")
_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """The PostgreSQL text of a statement written for SQLite (see the module doc)."""
    if sql.strip().upper() == "BEGIN IMMEDIATE":
        return "BEGIN"
    sql = _JSON.sub(r"(\1::jsonb ->> '\2')", sql)
    sql = _INDEXED_BY.sub("", sql)
    # SQLite's json_each over an array yields its items as ``value``, as does this.
    sql = sql.replace("json_each(?)", "json_array_elements_text(?::json)")
    out: list[str] = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


_DDL_TYPES: Final = (
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def pg_schema(sqlite_schema: str) -> list[str]:
    """The statements of server/db.py's SQLite schema, in PostgreSQL's dialect.

    ``reports`` gains an explicit ``rowid`` identity column: the registry
    keeps each device's newest report ids by SQLite's implicit rowid.
    """
    statements = []
    for statement in sqlite_schema.split(";"):
        text = "\n".join(line.split("--")[0] for line in statement.splitlines()).strip()
        if not text:
            continue
        for pattern, replacement in _DDL_TYPES:
            text = pattern.sub(replacement, text)
        text = _JSON.sub(r"((\1::jsonb ->> '\2'))", text)
        if text.startswith("CREATE TABLE IF NOT EXISTS reports "):
            text = text.replace("(", "(\n    rowid BIGINT GENERATED ALWAYS AS IDENTITY,", 1)
        statements.append(text)
    return statements


# --- rows and cursors ----------------------------------------------------------------


class PgRow(tuple[Any, ...]):
    """A row readable as ``row[0]`` and ``row["column"]``, like sqlite3.Row."""

    _names: tuple[str, ...]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = tuple(c.name for c in cursor.description or ())
    cls = type("Row", (PgRow,), {"_names": names})

    def make(values: Sequence[Any]) -> PgRow:
        row: PgRow = cls(values)
        return row

    return make


class PgCursor:
    """The result of one statement: rows already fetched, and the row count."""

    def __init__(self, rows: list[PgRow], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self._rowcount = rowcount

    @property
    def rowcount(self) -> int:
        return self._rowcount

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._next :]
        self._next = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


# --- the connection --------------------------------------------------------------------


class PgConnection:
    """PostgreSQL with sqlite3.Connection's surface: autocommit connections.

    ``pool_size``: connections for worker threads (:meth:`bound`); 0 keeps
    the one dedicated connection only. Raises :class:`PgUnavailable` if
    PostgreSQL cannot be reached at first.
    """

    def __init__(self, url: str, pool_size: int = 0) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise PgUnavailable(
                "the PostgreSQL backend needs psycopg: pip install 'fleetpush[postgres]'"
            ) from e
        self._psycopg = psycopg
        self.url = url
        self._conn: Any = None
        self._backoff = MIN_BACKOFF
        self._next_try = 0.0
        #: the pool connection bound to the calling thread, if any (bound())
        self._local = threading.local()
        self._owner = threading.get_ident()
        #: statements sent on the dedicated connection from its own thread:
        #: the tests' check that moved paths stay off the trio thread.
        self.loop_calls = 0
        self._connect()
        self._pool: Any = None
        self.pool_size = pool_size
        if pool_size > 0:
            self._pool = self._open_pool(pool_size)

    def _kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        }

    def _configure(self, conn: Any) -> None:
        conn.adapters.register_dumper(bool, _bool_dumper(self._psycopg))
        conn.row_factory = _row_factory

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, **self._kwargs())
        except psycopg.Error as e:
            raise PgUnavailable(_line(e)) from e
        self._configure(conn)
        self._conn = conn

    def _open_pool(self, size: int) -> Any:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as e:
            raise PgUnavailable(
                "the PostgreSQL backend needs psycopg_pool: pip install 'fleetpush[postgres]'"
            ) from e
        # Fixed size (min = max): a releaser's load is steady, and a connection
        # opened on demand would cost a handshake inside a device's request.
        # Opened without waiting: the dedicated connection above already
        # proved the database reachable; the pool fills in its own threads and
        # reconnects by itself after PostgreSQL comes back.
        pool = ConnectionPool(
            self.url,
            min_size=size,
            max_size=size,
            kwargs=self._kwargs(),
            configure=self._configure,
            timeout=CONNECT_TIMEOUT_S,
            name="fleetpush",
            open=False,
        )
        pool.open(wait=False)
        return pool

    @contextmanager
    def bound(self) -> Iterator[None]:
        """Bind a pool connection to this thread for the block (see the module doc).

        A broken connection goes back to the pool, which discards it and opens
        another. Raises :class:`PgUnavailable` when none is free within
        CONNECT_TIMEOUT_S (PostgreSQL is down: the pool cannot refill).
        """
        if self._pool is None or getattr(self._local, "conn", None) is not None:
            yield  # no pool, or already bound (a nested call): nothing to bind
            return
        import psycopg_pool

        try:
            ctx = self._pool.connection()
            conn = ctx.__enter__()
        except (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as e:
            raise PgUnavailable(f"no PostgreSQL connection: {_line(e)}") from e
        self._local.conn = conn
        try:
            yield
        except BaseException as e:
            self._local.conn = None
            # The pool rolls back an open transaction and discards a broken
            # connection on the way back.
            if not ctx.__exit__(type(e), e, e.__traceback__):
                raise
        else:
            self._local.conn = None
            ctx.__exit__(None, None, None)

    def _current(self) -> Any:
        """The connection for this thread: its bound one, else the dedicated one."""
        bound = getattr(self._local, "conn", None)
        if bound is not None:
            return bound
        if threading.get_ident() == self._owner:
            self.loop_calls += 1
        return self._ensure()

    def _ensure(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        now = time.monotonic()
        if now < self._next_try:
            raise PgUnavailable(f"{redact(self.url)} is unreachable; retrying")
        try:
            self._connect()
        except PgUnavailable:
            self._next_try = now + self._backoff
            log.warning(
                "PostgreSQL at %s unreachable, next try in %.1f s",
                redact(self.url),
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            raise
        log.warning("PostgreSQL at %s reconnected", redact(self.url))
        self._backoff = MIN_BACKOFF
        return self._conn

    @property
    def in_transaction(self) -> bool:
        conn = getattr(self._local, "conn", None) or self._conn
        if conn is None or conn.closed:
            return False
        idle = self._psycopg.pq.TransactionStatus.IDLE
        return bool(conn.info.transaction_status != idle)

    def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> PgCursor:
        if sql.lstrip().upper().startswith("PRAGMA"):
            return PgCursor([], -1)
        conn = self._current()
        try:
            if sql.strip().upper() == "BEGIN IMMEDIATE":
                conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                return PgCursor([], -1)
            cur = conn.execute(translate(sql), tuple(parameters))
            rows = cur.fetchall() if cur.description is not None else []
            return PgCursor(rows, cur.rowcount)
        except self._psycopg.Error as e:
            raise self._wrap(conn, e) from e

    def executemany(self, sql: str, seq: Iterable[Iterable[Any]], /) -> PgCursor:
        conn = self._current()
        try:
            with conn.cursor() as cur:
                # psycopg 3 sends the rows in pipeline mode: one round trip per batch.
                cur.executemany(translate(sql), [tuple(p) for p in seq])
                return PgCursor([], cur.rowcount)
        except self._psycopg.Error as e:
            raise self._wrap(conn, e) from e

    def _wrap(self, conn: Any, e: Exception) -> PgError:
        errors = self._psycopg.errors
        row_errors = (errors.IntegrityError, errors.DataError, errors.ProgrammingError)
        if isinstance(e, row_errors) and not isinstance(e, errors.UndefinedTable):
            return PgRowError(_line(e))
        if conn is not None and conn.broken:
            log.warning("PostgreSQL connection lost: %s", _line(e))
        return PgUnavailable(_line(e))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._conn is not None:
            self._conn.close()

    def __del__(self) -> None:
        # As a sqlite3.Connection does: an unreferenced connection is closed
        # quietly (psycopg would warn that it was left open).
        conn = getattr(self, "_conn", None)
        if conn is not None and not conn.closed:
            conn.close()
        pool = getattr(self, "_pool", None)
        if pool is not None and not pool.closed:
            pool.close(timeout=0)


def _bool_dumper(psycopg: Any) -> Any:
    """Python bools are stored as 0/1 integers, as SQLite stores them."""
    from psycopg.adapt import Dumper

    class BoolAsInt(Dumper):
        oid = psycopg.adapters.types["int8"].oid

        def dump(self, obj: Any) -> bytes:
            return b"1" if obj else b"0"

    return BoolAsInt


def _line(e: BaseException) -> str:
    """psycopg's message on one line (messages people read are one line)."""
    return " ".join(str(e).split())


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
