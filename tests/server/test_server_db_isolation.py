"""One bad row never costs other rows their writes, nor reads their answers (issue 10, item 1).

Unit tests of ``db.WriteBehind`` on a real SQLite file, then a real releaser
where one device sends a u64 past 2**63 in ``update_progress`` while another
reports ``committed``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio
from fleetpush.protocol.messages import UpdateProgress
from fleetpush.server import ServerConfig, db
from fp_releaser import running_releaser
from server_helpers import connect, wait_for

UPDATE_STATE = "UPDATE devices SET state = ?, bytes_done = ? WHERE device_id = ?"
INSERT_EVENT = "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)"


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    conn = db.open_database(tmp_path / "data")
    for i in range(5):
        conn.execute(
            "INSERT INTO devices (device_id, public_key, enrollment, first_seen, last_seen)"
            " VALUES (?, x'00', 'accepted', 0, 0)",
            (f"dev-{i}",),
        )
    return conn


def states(conn: sqlite3.Connection) -> dict[str, tuple[str, int]]:
    rows = conn.execute("SELECT device_id, state, bytes_done FROM devices").fetchall()
    return {r["device_id"]: (r["state"], r["bytes_done"]) for r in rows}


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param(2**64 - 1, id="u64 past 2**63 (OverflowError)"),
        pytest.param([1, 2], id="a value SQLite cannot bind (ProgrammingError)"),
    ],
)
def test_a_poisoned_row_is_dropped_alone(conn: sqlite3.Connection, poison: object) -> None:
    writer = db.WriteBehind(conn)
    writer.add(UPDATE_STATE, ("committed", 10, "dev-0"))
    writer.add(UPDATE_STATE, ("downloading", poison, "dev-1"))
    writer.add(UPDATE_STATE, ("committed", 30, "dev-2"))
    writer.add(INSERT_EVENT, (1, 0.0, "progress", "dev-2", "{}"))
    writer.flush()  # must not raise
    assert len(writer) == 0
    assert writer.dropped == 1
    assert writer.last_error is not None
    got = states(conn)
    assert got["dev-0"] == ("committed", 10)
    assert got["dev-1"] == ("idle", 0)  # the bad row, and only it, is gone
    assert got["dev-2"] == ("committed", 30)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    assert not conn.in_transaction


def test_a_broken_constraint_is_dropped_alone(conn: sqlite3.Connection) -> None:
    writer = db.WriteBehind(conn)
    writer.add(INSERT_EVENT, (1, 0.0, "progress", "dev-0", "{}"))
    writer.add(INSERT_EVENT, (1, 0.0, "progress", "dev-1", "{}"))  # duplicate primary key
    writer.add(INSERT_EVENT, (2, 0.0, "progress", "dev-2", "{}"))
    writer.flush()
    assert writer.dropped == 1
    devices = [r[0] for r in conn.execute("SELECT device_id FROM events ORDER BY seq")]
    assert devices == ["dev-0", "dev-2"]


def test_good_batches_keep_one_transaction_and_clear_the_error(conn: sqlite3.Connection) -> None:
    writer = db.WriteBehind(conn)
    writer.add(UPDATE_STATE, ("downloading", 2**63, "dev-1"))
    writer.flush()
    assert writer.last_error is not None
    writer.add(UPDATE_STATE, ("committed", 2**63 - 1, "dev-1"))
    writer.flush()
    assert writer.last_error is None
    assert states(conn)["dev-1"] == ("committed", 2**63 - 1)


def test_a_read_after_a_failed_write_still_answers(conn: sqlite3.Connection) -> None:
    """Reads flush first (registry.get): a queued bad row must not make them raise."""
    from fleetpush.server.registry import DeviceRegistry

    writer = db.WriteBehind(conn)
    registry = DeviceRegistry(conn, writer)
    writer.add(UPDATE_STATE, ("downloading", 2**64 - 1, "dev-3"))
    writer.add(UPDATE_STATE, ("committed", 5, "dev-4"))
    row = registry.get("dev-4")
    assert row is not None
    assert row["state"] == "committed"


def test_a_database_that_refuses_writes_keeps_the_rows(tmp_path: Path) -> None:
    """Locked past the busy timeout: nothing is dropped, the rows wait for the next flush."""
    conn = db.open_database(tmp_path / "data")
    conn.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(db.db_path(tmp_path / "data"), isolation_level=None)
    writer = db.WriteBehind(conn)
    writer.add("INSERT INTO meta (key, value) VALUES (?, ?)", ("a", "1"))
    other.execute("BEGIN IMMEDIATE")
    writer.flush()  # must not raise
    assert len(writer) == 1
    assert writer.dropped == 0
    assert writer.last_error is not None and "locked" in writer.last_error
    other.execute("ROLLBACK")
    writer.flush()
    assert len(writer) == 0
    assert db.get_meta(conn, "a") == "1"


def test_transaction_reraises_the_real_error_not_the_rollback(conn: sqlite3.Connection) -> None:
    """SQLite may already have rolled back; a second ROLLBACK must not mask the cause."""

    class Boom(Exception):
        pass

    with pytest.raises(Boom), db.transaction(conn):
        conn.execute("ROLLBACK")  # as SQLite does by itself on SQLITE_FULL or SQLITE_IOERR
        raise Boom
    assert not conn.in_transaction
    with db.transaction(conn):  # the connection is still usable
        conn.execute("UPDATE devices SET state = 'x' WHERE device_id = 'dev-0'")
    assert states(conn)["dev-0"][0] == "x"


def unchecked_progress(bytes_done: int) -> UpdateProgress:
    """What a peer without our validators sends: the field set behind attrs' back."""
    progress = UpdateProgress(state="downloading", bytes_total=1)
    object.__setattr__(progress, "bytes_done", bytes_done)
    return progress


async def test_releaser_a_huge_integer_costs_no_other_device_its_writes(
    config: ServerConfig,
) -> None:
    """One device sends bytes_done = 2**64-1; another's ``committed`` is stored, handshakes work."""
    with trio.fail_after(30):
        async with running_releaser(config) as handle:
            port = handle.port
            async with (
                connect(port, peer_id="honest") as honest,
                connect(port, peer_id="stranger") as stranger,
            ):
                # Both in the same write-behind batch (FLUSH_INTERVAL is 0.1 s).
                await honest.peer.notify(
                    "update_progress", UpdateProgress(state="committed", app="demo", version="1.1")
                )
                await stranger.peer.notify("update_progress", unchecked_progress(2**64 - 1))
                await stranger.peer.closed.wait()  # refused: the stranger's link is closed
                assert "bytes_done" in (stranger.peer.close_reason or "")
                await honest.peer.notify(
                    "update_progress", UpdateProgress(state="committed", app="demo", version="1.1")
                )

                # Read as another process would: the releaser commits every 0.1 s.
                reader = sqlite3.connect(db.db_path(config.data_dir))

                def stored() -> bool:
                    row = reader.execute(
                        "SELECT last_result, version FROM devices WHERE device_id = 'honest'"
                    ).fetchone()
                    if row is None or row[0] is None:
                        return False
                    result = json.loads(row[0])  # an object (specs/PROTOCOL.md §7.9)
                    return (result["state"], result["version"], row[1]) == (
                        "committed",
                        "1.1",
                        "1.1",
                    )

                await wait_for(stored)
                reader.close()
                assert not honest.peer.closed.is_set()
            for i in range(3):  # handshakes still work
                async with connect(port, peer_id=f"later-{i}") as later:
                    assert later.status == "accepted"
