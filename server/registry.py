"""The device registry (SQLite rows) and the push queue.

Devices: id, public key, enrollment, app, installed version, channel, group,
announced sequence, update state and bytes, staged version, first and last
seen, last update result, supervised app status.

Pushes (see fleetpush.server.session for the modes): one ``pushes`` row per
operator push and one ``push_targets`` row per target device, whose ``state``
records delivery: ``queued`` (not yet sent), ``sent`` (waiting for the ack),
``accepted`` / ``refused`` (the device's ack), ``error`` (it answered an
error), ``timeout`` (no ack in time: sent again on its next connection),
``superseded`` (a newer push to the same device replaced it before delivery).
``result`` follows the device's ``update_progress`` for that push.

``accepted`` is not the end: a push the device accepted but has not finished
(``result`` not in :data:`FINISHED`) is sent again each time the device
connects, as long as it is the device's newest push (issue 10, item 10;
specs/PROTOCOL.md §7.4). A device that still holds it acknowledges it again
without a second download; one that lost it (e.g. an older device killed
right after its ack) starts it.

Whether a push is re-offered depends on its ``result`` only, never on the
version the device later reports (a repair or a rollback does not reopen a
finished push: the operator decides whether to push again). So ``result`` is
kept deterministic: a finished result is final (a late progress row of the
same push, applied by the write-behind after it, does not reopen it), and a
device's ``committed`` report that names no push (the install engine does not
know it) finishes the device's accepted pushes of that version.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Final

from attrs import frozen
from fleetpush.protocol.messages import Delivery, DeviceInfo, Hello, Outcome, UpdateProgress

from . import db
from .errors import NotFound

#: Delivery states that are (re)sent when the device is connected.
PENDING_STATES: Final = ("queued", "sent", "timeout")

#: Outcome report ids remembered per device, to ignore re-sent reports.
REPORT_IDS_KEPT: Final = 200

#: Results after which an accepted push is finished: once committed or given
#: up; a push that only stages (mode ``stage``, or ``restart`` false) once staged.
FINISHED: Final = ("committed", "rolled_back", "failed")
FINISHED_STAGING: Final = ("staged", *FINISHED)


@frozen(kw_only=True)
class PendingCommand:
    target_id: int
    push_id: str
    app: str
    version: str
    mode: str
    restart: bool


class DeviceRegistry:
    def __init__(self, conn: db.Connection, writer: db.WriteBehind | None = None) -> None:
        self.conn = conn
        self.writer = writer if writer is not None else db.WriteBehind(conn)

    def get(self, device_id: str) -> db.Row | None:
        self.writer.flush()
        row: db.Row | None = self.conn.execute(
            "SELECT * FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        return row

    def get_many(self, device_ids: list[str]) -> dict[str, db.Row]:
        """The rows of those of ``device_ids`` that exist, 500 ids per statement.

        For a deployment's start: one statement per device was one PostgreSQL
        round trip per device on the trio thread (scripts/cluster_bench.py).
        """
        self.writer.flush()
        found: dict[str, db.Row] = {}
        for i in range(0, len(device_ids), 500):
            part = device_ids[i : i + 500]
            marks = ",".join("?" * len(part))
            query = f"SELECT * FROM devices WHERE device_id IN ({marks})"  # noqa: S608 - marks
            for row in self.conn.execute(query, part):
                found[row["device_id"]] = row
        return found

    def require(self, device_id: str) -> db.Row:
        row = self.get(device_id)
        if row is None:
            raise NotFound(f"no device {device_id!r}")
        return row

    def register(self, hello: Hello, enrollment: str, now: float) -> db.Row:
        """Insert a new device, or refresh what a known one announced. Returns its row.

        A known device's handshake only reads (issue 10, item 2): what changed
        in its hello, and ``last_seen``, go through the write-behind, which
        never fails the caller; so known devices still connect when the data
        dir is full. Its row is returned as read (a changed field shows once
        written). Only a new device needs a write here: raises
        :class:`db.DatabaseError` if it cannot be inserted.
        """
        row = self.get(hello.peer_id)
        if row is not None:
            changed = {
                column: value
                for column, value in (
                    ("app", hello.app),
                    ("version", hello.version),
                    ("channel", hello.channel),
                    ("grp", hello.group),
                    ("sequence", hello.sequence),
                )
                if row[column] != value
            }
            sets = "".join(f"{column} = ?, " for column in changed)
            self.writer.add(
                f"UPDATE devices SET {sets}last_seen = ? WHERE device_id = ?",  # noqa: S608 - fixed names
                (*changed.values(), now, hello.peer_id),
            )
            return row
        try:
            self._insert(hello, enrollment, now)
        except (*db.ERRORS, *db.ROW_ERRORS) as e:
            raise db.DatabaseError(f"registering device {hello.peer_id}: {e}") from e
        return self.require(hello.peer_id)

    def _insert(self, hello: Hello, enrollment: str, now: float) -> None:
        self.conn.execute(
            "INSERT INTO devices (device_id, public_key, enrollment, app, version, channel, grp,"
            " sequence, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (device_id) DO UPDATE SET app = excluded.app, version = excluded.version,"
            " channel = excluded.channel, grp = excluded.grp, sequence = excluded.sequence,"
            " last_seen = excluded.last_seen",
            (
                hello.peer_id,
                hello.public_key,
                enrollment,
                hello.app,
                hello.version,
                hello.channel,
                hello.group,
                hello.sequence,
                now,
                now,
            ),
        )

    def set_enrollment(self, device_id: str, decision: str) -> db.Row:
        """Raises :class:`NotFound`."""
        self.require(device_id)
        self.conn.execute(
            "UPDATE devices SET enrollment = ? WHERE device_id = ?", (decision, device_id)
        )
        return self.require(device_id)

    def touch(self, device_id: str, now: float) -> None:
        self.writer.add("UPDATE devices SET last_seen = ? WHERE device_id = ?", (now, device_id))

    def record_check(
        self, device_id: str, *, version: str, channel: str, sequence: int, now: float
    ) -> None:
        self.writer.add(
            "UPDATE devices SET version = ?, channel = ?, sequence = ?, last_seen = ?"
            " WHERE device_id = ?",
            (version, channel, sequence, now, device_id),
        )

    def record_progress(self, device_id: str, p: UpdateProgress, now: float) -> None:
        self.writer.add(*_progress_row(device_id, p, now))

    def record_outcomes(
        self, device_id: str, outcomes: Sequence[Outcome], now: float
    ) -> list[Outcome]:
        """Record a device's outcome reports and commit them before returning.

        Reports already recorded (same ``report_id``) are ignored: a device
        re-sends what it has no acknowledgement for (specs/PROTOCOL.md §7.6.1).
        Returns the new ones. Raises :class:`db.DatabaseError` if the commit
        failed (then nothing may be acknowledged).
        """
        self.writer.flush()  # queued live progress first: it is older
        fresh: list[Outcome] = []
        try:
            # Not exclusive: every statement is about this device's rows, and
            # the first writes; the dedupe is the reports key (a concurrent
            # insert of the same id waits for the first, then does nothing).
            with db.transaction(self.conn, exclusive=False):
                for o in outcomes:
                    cur = self.conn.execute(
                        "INSERT INTO reports (device_id, report_id, time)"
                        " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (device_id, o.report_id, now),
                    )
                    if cur.rowcount == 0:
                        continue
                    fresh.append(o)
                    if not o.state:
                        continue
                    p = UpdateProgress(
                        state=o.state,
                        app=o.app,
                        version=o.version,
                        push_id=o.push_id,
                        error=o.error,
                    )
                    self.conn.execute(*_progress_row(device_id, p, now))
                    if o.push_id:
                        self.conn.execute(*_result_row(o.push_id, device_id, o.state, now))
                    elif o.state == "committed" and o.version:
                        self.conn.execute(*_committed_row(device_id, o.app, o.version, now))
                # A device re-sends at most its history (50 entries): keep a margin.
                self.conn.execute(
                    "DELETE FROM reports WHERE device_id = ? AND rowid NOT IN (SELECT rowid"
                    " FROM reports WHERE device_id = ? ORDER BY rowid DESC LIMIT ?)",
                    (device_id, device_id, REPORT_IDS_KEPT),
                )
        except (*db.ERRORS, *db.ROW_ERRORS) as e:
            raise db.DatabaseError(f"recording the outcomes of {device_id}: {e}") from e
        return fresh

    def record_app_status(self, device_id: str, status: dict[str, Any], now: float) -> None:
        self.writer.add(
            "UPDATE devices SET app_status = ?, last_seen = ? WHERE device_id = ?",
            (db.dumps(status), now, device_id),
        )

    def accepted_ids(
        self, app: str, group: str | None = None, staged_version: str | None = None
    ) -> list[str]:
        """Ids of the accepted devices of ``app`` (in ``group``, with ``staged_version``).

        A push to a group or to ``all`` needs only the ids: building 1000 full
        rows to filter them in Python cost the push handler several ms.
        """
        self.writer.flush()
        query = "SELECT device_id FROM devices WHERE app = ? AND enrollment = 'accepted'"
        args: list[Any] = [app]
        if group is not None:
            query += " AND grp = ?"
            args.append(group)
        if staged_version is not None:
            query += " AND staged_version = ?"
            args.append(staged_version)
        return [r[0] for r in self.conn.execute(query + " ORDER BY device_id", args)]

    def list(
        self,
        app: str | None = None,
        group: str | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
        state: str | None = None,
        version: str | None = None,
    ) -> list[db.Row]:
        """Rows by device id, those past ``after``, at most ``limit`` (a page, §7.7)."""
        self.writer.flush()
        query = "SELECT * FROM devices WHERE 1 = 1"
        args: list[Any] = []
        if state is not None:
            query += " AND state = ?"
            args.append(state)
        if version is not None:
            query += " AND version = ?"
            args.append(version)
        if app is not None:
            query += " AND app = ?"
            args.append(app)
        if group is not None:
            query += " AND grp = ?"
            args.append(group)
        if after is not None:
            query += " AND device_id > ?"
            args.append(after)
        query += " ORDER BY device_id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        return list(self.conn.execute(query, args))

    def forget(self, device_id: str) -> None:
        """Delete a device and its undelivered pushes (issue 10, item 8). Raises NotFound.

        Delivered pushes keep their rows: they are the push's history. A device
        that connects again under this id is enrolled anew.
        """
        self.require(device_id)
        states = ",".join("?" * len(PENDING_STATES))
        with db.transaction(self.conn):
            self.conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            self.conn.execute(
                f"DELETE FROM push_targets WHERE device_id = ? AND state IN ({states})",  # noqa: S608
                (device_id, *PENDING_STATES),
            )

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Accepted devices counted by installed version and by update state."""
        self.writer.flush()
        by_version = {
            str(r[0]): int(r[1])
            for r in self.conn.execute(
                "SELECT COALESCE(version, '?'), COUNT(*) FROM devices"
                " WHERE enrollment = 'accepted' GROUP BY 1"
            )
        }
        by_state = {
            str(r[0]): int(r[1])
            for r in self.conn.execute(
                "SELECT state, COUNT(*) FROM devices WHERE enrollment = 'accepted' GROUP BY 1"
            )
        }
        return by_version, by_state


def _progress_row(device_id: str, p: UpdateProgress, now: float) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE of a device's row for one progress report."""
    sets = ["state = ?", "bytes_done = ?", "bytes_total = ?", "last_seen = ?", "state_error = ?"]
    args: list[Any] = [p.state, p.bytes_done, p.bytes_total, now, p.error]
    detail = db.dumps(result_doc(p.state, p.version, p.error, now))
    if p.state == "staged" and p.version:
        sets.append("staged_version = ?")
        args.append(p.version)
    elif p.state == "trial" and p.version:
        # The version on trial is the one installed and running: VERSION kept
        # the old one until the commit (issue 11, item 6).
        sets.append("version = ?")
        args.append(p.version)
    elif p.state == "committed":
        sets += ["last_result = ?", "staged_version = NULL"]
        args.append(detail)
        if p.version:
            sets.append("version = ?")
            args.append(p.version)
    elif p.state in ("rolled_back", "failed"):
        sets += ["last_result = ?", "staged_version = NULL"]
        args.append(detail)
        if p.state == "rolled_back" and p.version:
            # A rollback reports the version it runs again (specs/PROTOCOL.md §7.6).
            sets.append("version = ?")
            args.append(p.version)
    return (
        f"UPDATE devices SET {', '.join(sets)} WHERE device_id = ?",  # noqa: S608 - fixed names
        (*args, device_id),
    )


def _result_row(
    push_id: str, device_id: str, result: str, now: float
) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE of a push's ``result`` for the device's report naming it.

    Only a finished result replaces a finished one: progress is written
    behind (server/db.py), so a late row of the same push (a repeated
    command's ``checking``, say) must not reopen it and make the releaser
    offer it again (specs/PROTOCOL.md §7.4).
    """
    query = "UPDATE push_targets SET result = ?, updated = ? WHERE push_id = ? AND device_id = ?"
    args: tuple[Any, ...] = (result, now, push_id, device_id)
    if result not in FINISHED:
        query += f" AND (result IS NULL OR result NOT IN ({','.join('?' * len(FINISHED))}))"
        args += FINISHED
    return query, args


def _committed_row(
    device_id: str, app: str, version: str, now: float
) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE finishing the device's accepted pushes of (app, version) as committed.

    The device commits an update when its trial ends, in the install engine,
    which does not know which push brought it: its ``committed`` report names
    no push. That version is then installed and confirmed, which is what every
    push of it to this device asked for, so those pushes are finished and not
    offered again, whatever the device reports later (specs/PROTOCOL.md §7.4).
    Other outcomes are not attributed by version: a ``rolled_back`` report
    carries the version the device runs again, not the one that failed.
    """
    marks = ",".join("?" * len(FINISHED))
    return (
        "UPDATE push_targets SET result = 'committed', updated = ?"  # noqa: S608 - fixed names
        " WHERE device_id = ? AND state = 'accepted'"
        f" AND (result IS NULL OR result NOT IN ({marks}))"
        " AND push_id IN (SELECT push_id FROM pushes WHERE app = ? AND version = ?)",
        (now, device_id, *FINISHED, app, version),
    )


def result_doc(
    state: str, version: str | None, error: str | None, time: float | None
) -> dict[str, Any]:
    """A ``last_result`` (specs/PROTOCOL.md §7.9): the same object in ``devices``
    and in the device's own ``status`` (client/reporting.py result_doc)."""
    return {
        "state": state,
        "version": version or None,
        "error": error,
        "time": None if time is None else round(time, 3),
    }


def _last_result(text: str | None) -> dict[str, Any] | None:
    """The stored ``last_result``: a JSON object, or the text rows written before it was one
    (``STATE [VERSION][: ERROR]``)."""
    if text is None:
        return None
    try:
        doc = db.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    head, _, error = text.partition(": ")
    state, _, version = head.partition(" ")
    return result_doc(state, version, error or None, None)


#: Longest free text (last result, app status error) in a listing's row.
LISTED_TEXT: Final = 256


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= LISTED_TEXT:
        return text
    return text[:LISTED_TEXT] + "..."


def device_info(row: db.Row, connected: bool, *, listed: bool = False) -> DeviceInfo:
    """A row as the wire's DeviceInfo; ``listed``: as a listing's row.

    A listing leaves out the app's log tail and clips free text to
    :data:`LISTED_TEXT`: one device's bulky status used to make every
    ``list_devices`` answer exceed the message limit (issue 10, item 8).
    """
    app_status = db.loads(row["app_status"])
    last_result = _last_result(row["last_result"])
    state_error = row["state_error"]
    if listed:
        state_error = _clip(state_error)
        if last_result is not None and isinstance(last_result.get("error"), str):
            last_result["error"] = _clip(last_result["error"])
        if isinstance(app_status, dict):
            app_status = {k: v for k, v in app_status.items() if k != "log_tail"}
            if isinstance(app_status.get("error"), str):
                app_status["error"] = _clip(app_status["error"])
    return DeviceInfo(
        device_id=row["device_id"],
        public_key=bytes(row["public_key"]),
        enrollment=row["enrollment"],
        app=row["app"],
        version=row["version"],
        channel=row["channel"],
        group=row["grp"],
        state=row["state"],
        connected=connected,
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        last_result=last_result,
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        app_status=app_status,
        trial_version=row["version"] if row["state"] == "trial" else None,
        state_error=state_error,
    )


class PushStore:
    def __init__(self, conn: db.Connection, writer: db.WriteBehind | None = None) -> None:
        self.conn = conn
        self.writer = writer if writer is not None else db.WriteBehind(conn)

    def create(
        self,
        *,
        push_id: str,
        operator: str,
        app: str,
        version: str,
        mode: str,
        restart: bool,
        selector: dict[str, Any],
        targets: list[str],
        sent: Collection[str],
        now: float,
    ) -> dict[str, int]:
        """Record a push for ``targets`` (those in ``sent`` as already handed over).

        A new force/stage replaces any undelivered command to those devices; a
        new apply replaces only undelivered applies. Returns device id -> target row id.
        """
        modes = ("apply",) if mode == "apply" else ("force", "stage", "apply")
        marks = ",".join("?" * len(modes))
        states = ",".join("?" * len(PENDING_STATES))
        self.writer.flush()
        with db.transaction(self.conn):
            self.conn.execute(
                "INSERT INTO pushes (push_id, created, operator, app, version, mode, restart,"
                " selector) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (push_id, now, operator, app, version, mode, int(restart), db.dumps(selector)),
            )
            self.conn.execute(
                "UPDATE push_targets SET state = 'superseded', detail = ?, updated = ?"  # noqa: S608
                f" WHERE state IN ({states}) AND device_id IN (SELECT value FROM json_each(?))"
                f" AND push_id IN (SELECT push_id FROM pushes WHERE app = ? AND mode IN ({marks}))",
                (
                    f"replaced by push {push_id}",
                    now,
                    *PENDING_STATES,
                    db.dumps(targets),
                    app,
                    *modes,
                ),
            )
            self.conn.executemany(
                "INSERT INTO push_targets (push_id, device_id, state, updated) VALUES (?, ?, ?, ?)",
                [(push_id, d, "sent" if d in sent else "queued", now) for d in targets],
            )
            rows = self.conn.execute(
                "SELECT device_id, id FROM push_targets WHERE push_id = ?", (push_id,)
            )
            return {r[0]: r[1] for r in rows}

    def next_pending(self, device_id: str, skip: set[int]) -> PendingCommand | None:
        """The oldest push still to be sent to ``device_id`` (rows in ``skip`` aside).

        Queued, sent and timed-out pushes; and the device's newest push if it
        was accepted but is not finished (see the module docstring).
        """
        self.writer.flush()
        states = ",".join("?" * len(PENDING_STATES))
        query = (
            "SELECT t.id, t.push_id, p.app, p.version, p.mode, p.restart, t.state, t.result"  # noqa: S608
            " FROM push_targets t JOIN pushes p USING (push_id) WHERE t.device_id = ?"
            f" AND (t.state IN ({states}) OR (t.state = 'accepted' AND NOT EXISTS ("
            " SELECT 1 FROM push_targets n WHERE n.device_id = t.device_id AND n.id > t.id)))"
            " ORDER BY t.id"
        )
        for row in self.conn.execute(query, (device_id, *PENDING_STATES)):
            if row[0] in skip:
                continue
            stages_only = row[4] == "stage" or not row[5]
            if row[6] == "accepted" and row[7] in (FINISHED_STAGING if stages_only else FINISHED):
                continue
            return PendingCommand(
                target_id=row[0],
                push_id=row[1],
                app=row[2],
                version=row[3],
                mode=row[4],
                restart=bool(row[5]),
            )
        return None

    def mark(self, target_id: int, state: str, detail: str, now: float) -> None:
        self.writer.add(
            "UPDATE push_targets SET state = ?, detail = ?, updated = ? WHERE id = ?",
            (state, detail, now, target_id),
        )

    def record_result(self, push_id: str, device_id: str, result: str, now: float) -> None:
        """Queue the device's progress ``result`` for one push (a finished one is final)."""
        self.writer.add(*_result_row(push_id, device_id, result, now))

    def record_committed(self, device_id: str, app: str, version: str, now: float) -> None:
        """Queue: the device committed ``version`` of ``app`` in a report naming no push."""
        self.writer.add(*_committed_row(device_id, app, version, now))

    def deliveries_of(self, device_id: str, limit: int = 50) -> list[Delivery]:
        """The device's newest pushes, newest first (``get_device``)."""
        self.writer.flush()
        rows = self.conn.execute(
            "SELECT t.push_id, p.version, p.mode, t.state, t.detail, t.result, t.updated"
            " FROM push_targets t JOIN pushes p ON p.push_id = t.push_id"
            " WHERE t.device_id = ? ORDER BY t.id DESC LIMIT ?",
            (device_id, limit),
        )
        return [
            Delivery(
                push_id=r[0], version=r[1], mode=r[2], state=r[3], detail=r[4],
                result=r[5], updated=r[6],
            )
            for r in rows
        ]

    def delivery_counts(self) -> dict[str, int]:
        """Push targets counted by delivery state (metrics.py)."""
        self.writer.flush()
        rows = self.conn.execute("SELECT state, COUNT(*) FROM push_targets GROUP BY 1")
        return {str(r[0]): int(r[1]) for r in rows}

    def targets_of(self, device_id: str, app: str, version: str) -> bool:
        """True if a push of (app, version) ever targeted this device (it may then fetch it)."""
        self.writer.flush()
        row = self.conn.execute(
            "SELECT 1 FROM push_targets t JOIN pushes p USING (push_id)"
            " WHERE t.device_id = ? AND p.app = ? AND p.version = ? LIMIT 1",
            (device_id, app, version),
        ).fetchone()
        return row is not None

    def deliveries(self, push_id: str) -> dict[str, tuple[str, str, str | None]]:
        """device id -> (state, detail, result) for one push. Raises :class:`NotFound`."""
        self.writer.flush()
        rows = list(
            self.conn.execute(
                "SELECT device_id, state, detail, result FROM push_targets WHERE push_id = ?",
                (push_id,),
            )
        )
        if (
            not rows
            and self.conn.execute("SELECT 1 FROM pushes WHERE push_id = ?", (push_id,)).fetchone()
            is None
        ):
            raise NotFound(f"no push {push_id!r}")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}
