"""A push's acks in batches: every ack recorded, across flushes, in two statements a flush.

Real SQLite files (db.open_database), the releaser's own stores and event hub
sharing one write-behind (as server/services.py wires them), and the ack
callback push_fanout.AckRecorder that a link's reader calls (net/answers.py).
What is counted is the statements the flush sends, not time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import trio
from fleetpush.protocol import ResponseReceived
from fleetpush.protocol.messages import Ack
from fleetpush.server import db
from fleetpush.server.events import EventHub
from fleetpush.server.push_fanout import AckRecorder, shared_command
from fleetpush.server.registry import PushStore

from fleetpush.net.peer import PeerClosed

log = logging.getLogger("test")


class Counting:
    """The releaser's connection, counting the executemany calls a flush makes."""

    def __init__(self, conn: db.Connection) -> None:
        self.conn = conn
        self.batches: list[tuple[str, int]] = []

    def executemany(self, sql: str, rows: Any) -> Any:
        rows = list(rows)
        self.batches.append((sql.split()[0], len(rows)))
        return self.conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


@attrs.define
class Deps:
    pushes: PushStore
    events: EventHub


def _setup(tmp_path: Path, n: int) -> tuple[Counting, db.WriteBehind, Deps, dict[str, int]]:
    conn = Counting(db.open_database(tmp_path))
    writer = db.WriteBehind(conn, max_pending=100_000)  # type: ignore[arg-type]
    deps = Deps(
        pushes=PushStore(conn, writer),  # type: ignore[arg-type]
        events=EventHub(conn, history_limit=10_000, queue_size=10, writer=writer),  # type: ignore[arg-type]
    )
    ids = deps.pushes.create(
        push_id="p1", operator="op", app="app", version="2.0.0", mode="force", restart=True,
        selector={"all": True}, targets=[f"d{i}" for i in range(n)],
        sent={f"d{i}" for i in range(n)}, now=1.0,
    )  # fmt: skip
    writer.flush()
    conn.batches.clear()
    return conn, writer, deps, ids


def test_acks_arriving_across_a_flush_boundary_are_all_recorded(tmp_path: Path) -> None:
    n = 50
    conn, writer, deps, ids = _setup(tmp_path, n)
    command = shared_command("p1", "app", "2.0.0", "force", True)
    seen: list[tuple[str, dict[str, Any]]] = []
    deps.events.listen(lambda e: seen.append((e.device_id or "", e.data)))
    recorders = {d: AckRecorder(deps, log, d, ids[d], command) for d in ids}

    def answer(device_id: str, ack: Ack | Exception) -> None:
        if isinstance(ack, Ack):
            recorders[device_id](ResponseReceived(id=1, method="__force_update__", result=ack))
        else:
            recorders[device_id](ack)

    for i in range(0, 30):
        answer(f"d{i}", Ack(accepted=True))
    writer.flush()  # the boundary: 30 acks committed, 20 still to come
    first = list(conn.batches)
    for i in range(30, 48):
        answer(f"d{i}", Ack(accepted=True))
    answer("d48", Ack(accepted=False, reason="no room"))
    answer("d49", PeerClosed(1000, "gone"))  # not an answer: stays 'sent' (§7.4)
    writer.flush()

    states = dict(conn.execute("SELECT device_id, state FROM push_targets").fetchall())
    assert states == {
        **{f"d{i}": "accepted" for i in range(48)}, "d48": "refused", "d49": "sent"
    }  # fmt: skip
    stored = conn.execute(
        "SELECT device_id, data FROM events WHERE kind = 'command_result' ORDER BY seq"
    ).fetchall()
    assert [r[0] for r in stored] == [f"d{i}" for i in range(49)]
    assert db.loads(stored[0][1]) == {
        "push_id": "p1", "method": "__force_update__", "version": "2.0.0",
        "state": "accepted", "detail": "",
    }  # fmt: skip
    assert db.loads(stored[48][1])["detail"] == "no room"
    # The listeners (the deployment scheduler) hear each device's answer.
    assert [d for d, _ in seen] == [f"d{i}" for i in range(49)]
    assert seen[48][1]["state"] == "refused"
    # Each flush: one UPDATE for its acks, one INSERT for their events.
    assert first == [("UPDATE", 30), ("INSERT", 30)]
    assert conn.batches[len(first) :] == [("UPDATE", 19), ("INSERT", 19)]


def test_held_back_event_rows_do_not_pass_a_prune(tmp_path: Path) -> None:
    conn, writer, deps, ids = _setup(tmp_path, 2)
    # As the hub queues them: events 1 and 2, a prune of seq <= 1, event 3.
    for device_id in ("d0", "d1"):
        deps.events.emit("command_result", device_id, {})
        deps.pushes.mark(ids[device_id], "accepted", "", 2.0)
    writer.add("DELETE FROM events WHERE seq <= ?", (1,))
    deps.events.emit("command_result", "d0", {})
    writer.flush()
    assert [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")] == [2, 3]
    assert conn.batches == [("UPDATE", 2), ("INSERT", 2), ("DELETE", 1), ("INSERT", 1)]


def test_a_timeout_and_a_late_ack_keep_their_order(tmp_path: Path) -> None:
    """Rows of one target keep their queue order: the last word wins."""
    conn, writer, deps, ids = _setup(tmp_path, 1)
    command = shared_command("p1", "app", "2.0.0", "force", True)
    AckRecorder(deps, log, "d0", ids["d0"], command)(trio.TooSlowError())
    deps.pushes.mark(ids["d0"], "accepted", "", 3.0)
    writer.flush()
    row = conn.execute("SELECT state FROM push_targets").fetchone()
    assert row[0] == "accepted"
