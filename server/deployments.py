"""Deployments in SQLite (specs/PROTOCOL.md §7.7.1): one row each, one row per target device.

A deployment's targets are resolved once, when it is created: the accepted
devices its selector named then, in a deterministic order (a hash of the
deployment id and the device id, so the first phase is a spread sample, not
the alphabetically first devices), each assigned its phase. Devices
enrolled later are not added: create another deployment for them.

Every change the scheduler (rollout.py) or an operator makes is committed
before it is acted on or acknowledged, never written behind: a deployment
halted, paused or aborted stays so across a releaser restart, and an
acknowledged ``deploy_*`` command is never lost. State changes are
compare-and-set (``WHERE state IN expected``), which is what makes a halt
idempotent: two failures crossing the threshold at once halt once.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Final

from attrs import frozen
from fleetpush.protocol.messages import DeploymentDevice, DeploymentInfo

from . import db
from .errors import NotFound

#: States in which a deployment still owns its app's devices (one per app).
ACTIVE: Final = ("running", "paused", "halted")
#: Device states the scheduler still follows (outcomes may arrive).
OPEN_DEVICE: Final = ("started", "deferred")


@frozen(kw_only=True)
class Deployment:
    """A ``deployments`` row."""

    deployment_id: str
    created: float
    operator: str
    app: str
    version: str
    selector: dict[str, Any]
    phases: list[int]
    phase: int
    phase_started: float
    max_concurrent: int
    failure_percent: float | None
    min_executed: int
    on_halt: str
    phase_wait: float | None
    device_timeout: float
    restart: bool | None
    state: str
    reason: str
    paused_from: str | None
    base_succeeded: int
    base_failed: int

    @classmethod
    def of(cls, row: db.Row) -> Deployment:
        return cls(
            deployment_id=row["deployment_id"],
            created=row["created"],
            operator=row["operator"],
            app=row["app"],
            version=row["version"],
            selector=db.loads(row["selector"]),
            phases=[int(n) for n in db.loads(row["phases"])],
            phase=row["phase"],
            phase_started=row["phase_started"],
            max_concurrent=row["max_concurrent"],
            failure_percent=row["failure_percent"],
            min_executed=row["min_executed"],
            on_halt=row["on_halt"],
            phase_wait=row["phase_wait"],
            device_timeout=row["device_timeout"],
            restart=None if row["restart"] is None else bool(row["restart"]),
            state=row["state"],
            reason=row["reason"],
            paused_from=row["paused_from"],
            base_succeeded=row["base_succeeded"],
            base_failed=row["base_failed"],
        )

    def info(
        self,
        counts: dict[str, int],
        devices: Sequence[DeploymentDevice] = (),
        next: str | None = None,
    ) -> DeploymentInfo:
        return DeploymentInfo(
            deployment_id=self.deployment_id,
            app=self.app,
            version=self.version,
            state=self.state,
            reason=self.reason,
            created=self.created,
            operator=self.operator,
            phase=self.phase,
            phases=list(self.phases),
            targets=sum(counts.values()),
            counts=counts,
            max_concurrent=self.max_concurrent,
            halt_after_failures=self.failure_percent,
            min_executed=self.min_executed,
            on_halt=self.on_halt,
            phase_wait=self.phase_wait,
            device_timeout=self.device_timeout,
            selector=self.selector,
            devices=list(devices),
            next=next,
        )


def rollout_order(deployment_id: str, device_ids: Iterable[str]) -> list[str]:
    """``device_ids`` in the deployment's deterministic, spread-out order."""
    return sorted(
        device_ids,
        key=lambda d: (hashlib.sha256(f"{deployment_id}\0{d}".encode()).digest(), d),
    )


class DeploymentStore:
    """Deployment rows (every write committed before returning).

    No state of its own: its reads may run in a worker thread (db_calls.py).
    """

    def __init__(self, conn: db.Connection) -> None:
        self.conn = conn

    # --- reading --------------------------------------------------------------------

    def get(self, deployment_id: str) -> Deployment | None:
        row = self.conn.execute(
            "SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,)
        ).fetchone()
        return None if row is None else Deployment.of(row)

    def require(self, deployment_id: str) -> Deployment:
        """Raises :class:`NotFound`."""
        dep = self.get(deployment_id)
        if dep is None:
            raise NotFound(f"no deployment {deployment_id!r}")
        return dep

    def list(
        self, app: str | None = None, states: Sequence[str] = (), limit: int = 1000
    ) -> list[Deployment]:
        """Newest first."""
        query = "SELECT * FROM deployments WHERE 1 = 1"
        args: list[Any] = []
        if app is not None:
            query += " AND app = ?"
            args.append(app)
        if states:
            query += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        query += " ORDER BY created DESC, deployment_id LIMIT ?"
        args.append(limit)
        return [Deployment.of(r) for r in self.conn.execute(query, args)]

    def active_for_app(self, app: str) -> Deployment | None:
        marks = ",".join("?" * len(ACTIVE))
        row = self.conn.execute(
            f"SELECT * FROM deployments WHERE app = ? AND state IN ({marks})"  # noqa: S608
            " ORDER BY created DESC LIMIT 1",
            (app, *ACTIVE),
        ).fetchone()
        return None if row is None else Deployment.of(row)

    def counts(self, deployment_id: str) -> dict[str, int]:
        """Its devices by state."""
        rows = self.conn.execute(
            "SELECT state, COUNT(*) FROM deployment_devices WHERE deployment_id = ? GROUP BY 1",
            (deployment_id,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def counts_by_state(self) -> dict[str, int]:
        """Deployments by state (metrics.py)."""
        rows = self.conn.execute("SELECT state, COUNT(*) FROM deployments GROUP BY 1")
        return {str(r[0]): int(r[1]) for r in rows}

    def devices(
        self, deployment_id: str, after: int | None = None, limit: int = 1000
    ) -> builtins.list[tuple[int, DeploymentDevice]]:
        """(order, device) by rollout order, past ``after``."""
        rows = self.conn.execute(
            "SELECT * FROM deployment_devices WHERE deployment_id = ? AND ord > ?"
            " ORDER BY ord LIMIT ?",
            (deployment_id, -1 if after is None else after, limit),
        )
        return [
            (
                int(r["ord"]),
                DeploymentDevice(
                    device_id=r["device_id"],
                    phase=r["phase"],
                    state=r["state"],
                    reason=r["reason"],
                    push_id=r["push_id"],
                    started=r["started"],
                    finished=r["finished"],
                ),
            )
            for r in rows
        ]

    def pending(self, deployment_id: str, phase: int) -> builtins.list[str]:
        """Device ids not started yet, of phases up to ``phase``, by rollout order."""
        rows = self.conn.execute(
            "SELECT device_id FROM deployment_devices WHERE deployment_id = ? AND phase <= ?"
            " AND state = 'pending' ORDER BY ord",
            (deployment_id, phase),
        )
        return [r[0] for r in rows]

    def open_count(self, deployment_id: str, phase: int) -> int:
        """Devices of phases up to ``phase`` still pending or started (the phase gate)."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = ? AND phase <= ?"
            " AND state IN ('pending', 'started')",
            (deployment_id, phase),
        ).fetchone()
        return int(row[0])

    def open_devices(self) -> builtins.list[tuple[str, str, str, str, float]]:
        """(device, deployment, push id, state, started) of every started or deferred device
        of a deployment that is not aborted: what the scheduler follows after a restart."""
        rows = self.conn.execute(
            "SELECT d.device_id, d.deployment_id, d.push_id, d.state, d.started"
            " FROM deployment_devices d JOIN deployments p USING (deployment_id)"
            " WHERE d.state IN ('started', 'deferred') AND p.state != 'aborted'"
        )
        return [(r[0], r[1], r[2] or "", r[3], float(r[4] or 0.0)) for r in rows]

    def failed_before(self, app: str, version: str) -> dict[str, str]:
        """device id -> the deployment in which it failed this release (the penalty)."""
        rows = self.conn.execute(
            "SELECT d.device_id, d.deployment_id FROM deployment_devices d"
            " JOIN deployments p USING (deployment_id)"
            " WHERE p.app = ? AND p.version = ? AND d.state = 'failed'",
            (app, version),
        )
        return {r[0]: r[1] for r in rows}

    # --- writing (each committed before it returns) ----------------------------------

    def create(
        self, dep: Deployment, devices: Sequence[tuple[str, int, str, str]], now: float
    ) -> None:
        """Insert ``dep`` and its devices: (device id, phase, state, reason) in rollout order."""
        with db.transaction(self.conn):
            self.conn.execute(
                "INSERT INTO deployments (deployment_id, created, operator, app, version,"
                " selector, phases, phase, phase_started, max_concurrent, failure_percent,"
                " min_executed, on_halt, phase_wait, device_timeout, restart, state, reason,"
                " updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dep.deployment_id,
                    dep.created,
                    dep.operator,
                    dep.app,
                    dep.version,
                    db.dumps(dep.selector),
                    db.dumps(dep.phases),
                    dep.phase,
                    dep.phase_started,
                    dep.max_concurrent,
                    dep.failure_percent,
                    dep.min_executed,
                    dep.on_halt,
                    dep.phase_wait,
                    dep.device_timeout,
                    None if dep.restart is None else int(dep.restart),
                    dep.state,
                    dep.reason,
                    now,
                ),
            )
            self.conn.executemany(
                "INSERT INTO deployment_devices (deployment_id, device_id, ord, phase, state,"
                " reason, finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (dep.deployment_id, d, i, phase, state, reason, now if reason else None)
                    for i, (d, phase, state, reason) in enumerate(devices)
                ],
            )

    def set_state(
        self,
        deployment_id: str,
        state: str,
        reason: str,
        now: float,
        *,
        expect: Sequence[str],
        **columns: Any,
    ) -> bool:
        """Compare-and-set the deployment's state (and ``columns``); True if it changed.

        False when its state was not in ``expect`` (someone got there first).
        """
        sets = "".join(f", {c} = ?" for c in columns)
        marks = ",".join("?" * len(expect))
        cur = self.conn.execute(
            f"UPDATE deployments SET state = ?, reason = ?, updated = ?{sets}"  # noqa: S608 - fixed names
            f" WHERE deployment_id = ? AND state IN ({marks})",
            (state, reason, now, *columns.values(), deployment_id, *expect),
        )
        return cur.rowcount == 1

    def set_phase(self, deployment_id: str, phase: int, now: float) -> None:
        self.conn.execute(
            "UPDATE deployments SET phase = ?, phase_started = ?, updated = ?"
            " WHERE deployment_id = ?",
            (phase, now, now, deployment_id),
        )

    def mark_started(
        self, deployment_id: str, device_ids: Sequence[str], push_id: str, now: float
    ) -> None:
        self.conn.executemany(
            "UPDATE deployment_devices SET state = 'started', reason = '', push_id = ?,"
            " started = ?, finished = NULL WHERE deployment_id = ? AND device_id = ?",
            [(push_id, now, deployment_id, d) for d in device_ids],
        )

    def set_device(
        self,
        deployment_id: str,
        device_id: str,
        state: str,
        reason: str,
        now: float,
        *,
        expect: Sequence[str],
    ) -> bool:
        """Compare-and-set one device's state; True if it changed."""
        finished = now if state in ("succeeded", "failed", "skipped") else None
        marks = ",".join("?" * len(expect))
        cur = self.conn.execute(
            "UPDATE deployment_devices SET state = ?, reason = ?, finished = ?"  # noqa: S608
            f" WHERE deployment_id = ? AND device_id = ? AND state IN ({marks})",
            (state, reason, finished, deployment_id, device_id, *expect),
        )
        return cur.rowcount == 1

    def retry_failed(self, deployment_id: str) -> int:
        """Failed devices back to pending (``deploy resume --retry-failed``); how many."""
        cur = self.conn.execute(
            "UPDATE deployment_devices SET state = 'pending', reason = 'retried',"
            " finished = NULL WHERE deployment_id = ? AND state = 'failed'",
            (deployment_id,),
        )
        return cur.rowcount
