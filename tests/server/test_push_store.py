"""The push path's database helpers: target selection and write-behind batching."""

from __future__ import annotations

from pathlib import Path

from fleetpush.protocol.messages import Hello
from fleetpush.server import db
from fleetpush.server.registry import DeviceRegistry, PushStore


def _hello(device_id: str, app: str, group: str | None = None) -> Hello:
    return Hello(
        protocol_version="1.0",
        role="device",
        peer_id=device_id,
        public_key=bytes(32),
        app=app,
        version="1.0.0",
        channel="stable",
        group=group,
    )


def test_accepted_ids_select_like_the_full_rows_did(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    devices = DeviceRegistry(conn)
    devices.register(_hello("b", "app", "g1"), "accepted", 1.0)
    devices.register(_hello("a", "app", "g2"), "accepted", 1.0)
    devices.register(_hello("c", "app", "g1"), "pending", 1.0)
    devices.register(_hello("d", "other", "g1"), "accepted", 1.0)
    conn.execute("UPDATE devices SET staged_version = '2.0.0' WHERE device_id = 'b'")

    assert devices.accepted_ids("app") == ["a", "b"]
    assert devices.accepted_ids("app", "g1") == ["b"]
    assert devices.accepted_ids("app", None, "2.0.0") == ["b"]
    assert devices.accepted_ids("app", "g2", "2.0.0") == []
    assert devices.accepted_ids("nothing") == []


def test_accepted_ids_see_queued_writes(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    writer = db.WriteBehind(conn)
    devices = DeviceRegistry(conn, writer)
    devices.register(_hello("a", "app"), "accepted", 1.0)
    writer.add("UPDATE devices SET staged_version = ? WHERE device_id = ?", ("2.0.0", "a"))
    assert devices.accepted_ids("app", None, "2.0.0") == ["a"]


def test_write_behind_keeps_the_order_of_interleaved_statements(tmp_path: Path) -> None:
    conn = db.open_database(tmp_path)
    writer = db.WriteBehind(conn, max_pending=10_000)
    pushes = PushStore(conn, writer)
    ids = pushes.create(
        push_id="p1",
        operator="op",
        app="app",
        version="1.0.0",
        mode="force",
        restart=True,
        selector={"all": True},
        targets=["a", "b"],
        sent={"a"},
        now=1.0,
    )
    # Runs of one statement are batched; a later run must still win over an earlier one.
    pushes.mark(ids["a"], "timeout", "late", 2.0)
    pushes.mark(ids["b"], "timeout", "late", 2.0)
    writer.add(
        "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)",
        (1, 2.0, "command_result", "a", "{}"),
    )
    pushes.mark(ids["a"], "accepted", "", 3.0)
    writer.add(
        "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)",
        (2, 3.0, "command_result", "a", "{}"),
    )
    writer.add(
        "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)",
        (3, 3.0, "command_result", "b", "{}"),
    )
    writer.add("DELETE FROM events WHERE seq <= ?", (1,))
    assert len(writer) == 7
    deliveries = pushes.deliveries("p1")  # flushes first
    assert len(writer) == 0
    assert deliveries == {"a": ("accepted", "", None), "b": ("timeout", "late", None)}
    assert [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")] == [2, 3]
