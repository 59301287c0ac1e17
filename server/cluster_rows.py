"""The rows the cluster bus reads and writes, on the stores' connection (issue 15, part 2).

Each function is one small statement over a :class:`~.db.Connection`, so
they can move to a worker thread with the rest of the PostgreSQL calls. The
rows are the truth: a notification only says which of them to read
(specs/SCALE.md "Several releasers"). PostgreSQL only; raises the
connection's errors (``pg.PgError``).
"""

from __future__ import annotations

from typing import Final

from fleetpush.protocol.messages import Event

from . import db
from .cluster_batch import SEQ_BLOCK
from .pg import SCHEMA_LOCK_KEY
from .registry import PendingCommand

#: The database sequence event seqs come from, a block of SEQ_BLOCK at a time.
EVENT_SEQUENCE: Final = "fleetpush_event_seq"
#: The channel every releaser LISTENs on.
CHANNEL: Final = "fleetpush_cluster"
#: Rows read per catch-up query (the rest on the next round).
CATCH_UP_LIMIT: Final = 5000


def ensure_event_sequence(conn: db.Connection) -> None:
    """Create the event sequence past every stored seq (idempotent, under the schema lock).

    A database that a single releaser used before (seqs as MAX+1) keeps its
    history: the sequence starts after it, and is moved past it if it is behind.
    """
    with db.transaction(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))
        top = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
        conn.execute(
            f"CREATE SEQUENCE IF NOT EXISTS {EVENT_SEQUENCE} "
            f"INCREMENT BY {SEQ_BLOCK} START WITH {top + 1}"
        )
        row = conn.execute(
            f"SELECT last_value, is_called FROM {EVENT_SEQUENCE}"  # noqa: S608 - a constant
        ).fetchone()
        next_start = int(row[0]) + (SEQ_BLOCK if row[1] else 0)
        if next_start <= top:
            conn.execute(f"SELECT setval('{EVENT_SEQUENCE}', ?, false)", (top + 1,))


def take_seq_block(conn: db.Connection) -> int:
    """The first seq of a fresh block of SEQ_BLOCK (one round trip)."""
    return int(conn.execute(f"SELECT nextval('{EVENT_SEQUENCE}')").fetchone()[0])


def send_notify(conn: db.Connection, payload: str) -> None:
    """One NOTIFY on :data:`CHANNEL` (autocommit: delivered at once)."""
    conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))


def load_events(conn: db.Connection, seqs: list[int]) -> list[Event]:
    """The stored events among ``seqs``, in seq order."""
    if not seqs:
        return []
    marks = ",".join("?" * len(seqs))
    rows = conn.execute(
        f"SELECT * FROM events WHERE seq IN ({marks}) ORDER BY seq",  # noqa: S608 - marks only
        seqs,
    )
    return [
        Event(
            seq=r["seq"],
            time=r["time"],
            kind=r["kind"],
            device_id=r["device_id"],
            data=db.loads(r["data"]),
        )
        for r in rows
    ]


def event_seqs_since(conn: db.Connection, since: float) -> list[int]:
    """Seqs of the events stamped at or after ``since`` (the catch-up; index events_time)."""
    rows = conn.execute(
        "SELECT seq FROM events WHERE time >= ? ORDER BY time LIMIT ?", (since, CATCH_UP_LIMIT)
    )
    return [int(r[0]) for r in rows]


def queued_commands(conn: db.Connection, push_ids: list[str]) -> list[tuple[str, PendingCommand]]:
    """(device, command) of every target of these pushes still queued, one statement."""
    if not push_ids:
        return []
    marks = ",".join("?" * len(push_ids))
    rows = conn.execute(
        "SELECT t.id, t.device_id, t.push_id, p.app, p.version, p.mode, p.restart"  # noqa: S608
        " FROM push_targets t JOIN pushes p USING (push_id)"
        f" WHERE t.push_id IN ({marks}) AND t.state = 'queued'",
        push_ids,
    )
    return [
        (
            str(r[1]),
            PendingCommand(
                target_id=int(r[0]),
                push_id=str(r[2]),
                app=str(r[3]),
                version=str(r[4]),
                mode=str(r[5]),
                restart=bool(r[6]),
            ),
        )
        for r in rows
    ]


def queued_since(conn: db.Connection, since: float) -> list[str]:
    """Devices with a target queued since ``since`` (the catch-up of pushes)."""
    rows = conn.execute(
        "SELECT DISTINCT device_id FROM push_targets WHERE state = 'queued' AND updated >= ?"
        " LIMIT ?",
        (since, CATCH_UP_LIMIT),
    )
    return [str(r[0]) for r in rows]


def presence_events(conn: db.Connection, since: float) -> list[tuple[str, str, str | None]]:
    """(device, kind, releaser) of the ``connected``/``disconnected`` events since ``since``,
    oldest first: who holds which device, as far as the history says."""
    rows = conn.execute(
        "SELECT device_id, kind, json_extract(data, '$.releaser') FROM events"
        " WHERE kind IN ('connected', 'disconnected') AND time >= ? AND device_id IS NOT NULL"
        " ORDER BY time, seq",
        (since,),
    )
    return [(str(r[0]), str(r[1]), None if r[2] is None else str(r[2])) for r in rows]
