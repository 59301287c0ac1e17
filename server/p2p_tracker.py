"""The releaser as peer tracker (specs/PROTOCOL.md §7.11, issue 18): its tables.

All the SQL of peer delivery lives here, in the portable subset that runs on
both storage backends (server/db.py's Connection; the tables are in
server/schema.py): who serves peers from where
(``p2p_peers``: the address the releaser sees, the LAN the device reported,
its p2p port, what it holds) and who was reported for a lie (``p2p_bad``).
The choice of peers itself is pure (protocol/p2p_policy.py ``select_peers``).
"""

from __future__ import annotations

from fleetpush.protocol.p2p_policy import Candidate
from fleetpush.protocol.p2p_view import MAX_REPORTS, BadPeerReport, P2PQuery, P2PView

from .db import Connection


class PeerTracker:
    """Peer holdings and reports over the releaser's database (trio thread only)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def announce(
        self,
        device_id: str,
        *,
        app: str,
        public_addr: str,
        subnet: str | None,
        site: str | None,
        host: str | None,
        port: int,
        now: float,
    ) -> None:
        """Record where ``device_id`` is and whether it serves (it asked for peers)."""
        self.conn.execute(
            "INSERT INTO p2p_peers (device_id, app, public_addr, subnet, site, host, port, "
            "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
            "app = excluded.app, public_addr = excluded.public_addr, subnet = excluded.subnet, "
            "site = excluded.site, host = excluded.host, port = excluded.port, "
            "updated = excluded.updated",
            (device_id, app, public_addr, subnet, site, host, port, now),
        )

    def serving(self, app: str) -> list[Candidate]:
        """Devices of ``app`` that serve peers (what each holds is the registry's)."""
        rows = self.conn.execute(
            "SELECT device_id, public_addr, subnet, site, host, port FROM p2p_peers "
            "WHERE app = ? AND port > 0",
            (app,),
        ).fetchall()
        return [
            Candidate(
                device_id=r[0],
                public_addr=r[1],
                subnet=r[2],
                site=r[3],
                # its LAN address if it reported one (behind NAT the
                # public address is the router's), else the address seen.
                host=r[4] or r[1],
                port=r[5],
            )
            for r in rows
        ]

    def report(
        self, device_id: str, *, app: str, version: str, reporter: str, reason: str, now: float
    ) -> bool:
        """Record a report; True if it is the first against ``device_id`` for this release."""
        first = not self.bad(app, version) & {device_id}
        self.conn.execute(
            "INSERT INTO p2p_bad (device_id, app, version, reporter, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, app, version, reporter) "
            "DO UPDATE SET reason = excluded.reason, at = excluded.at",
            (device_id, app, version, reporter, reason, now),
        )
        return first

    def bad(self, app: str, version: str) -> frozenset[str]:
        """Devices reported for this release: never handed out for it again."""
        rows = self.conn.execute(
            "SELECT DISTINCT device_id FROM p2p_bad WHERE app = ? AND version = ?", (app, version)
        ).fetchall()
        return frozenset(r[0] for r in rows)

    def delivered(
        self,
        device_id: str,
        *,
        app: str,
        version: str,
        from_peers: int,
        from_releaser: int,
        now: float,
    ) -> None:
        """Record how a device's download arrived; a later report of it replaces this one."""
        self.conn.execute(
            "INSERT INTO p2p_delivered (device_id, app, version, from_peers, from_releaser, at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, app, version) DO UPDATE SET "
            "from_peers = excluded.from_peers, from_releaser = excluded.from_releaser, "
            "at = excluded.at",
            (device_id, app, version, from_peers, from_releaser, now),
        )

    def view(self, q: P2PQuery) -> P2PView:
        """The operator's view (``p2p_view``): reports and byte sums that match ``q``."""
        where: list[str] = []
        args: list[object] = []
        for column, value in (("app", q.app), ("version", q.version), ("device_id", q.device_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        # Only fixed column names and ? placeholders are joined in: values are bound.
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        rows = self.conn.execute(
            "SELECT device_id, app, version, reporter, reason, at FROM p2p_bad"  # noqa: S608
            f"{cond} ORDER BY at DESC LIMIT {MAX_REPORTS}",
            tuple(args),
        ).fetchall()
        reports = [
            BadPeerReport(
                device_id=r[0], app=r[1], version=r[2], reporter=r[3], reason=r[4], at=float(r[5])
            )
            for r in rows
        ]
        # The byte sums: over a deployment's devices (its own release), or over
        # every device's reports that match.
        dcond = [f"d.{w}" for w in where]
        dargs = list(args)
        join = ""
        if q.deployment_id is not None:
            join = (
                " JOIN deployment_devices dd ON dd.device_id = d.device_id"
                " JOIN deployments x ON x.deployment_id = dd.deployment_id"
            )
            dcond += ["dd.deployment_id = ?", "x.app = d.app", "x.version = d.version"]
            dargs.append(q.deployment_id)
        dwhere = (" WHERE " + " AND ".join(dcond)) if dcond else ""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(d.from_peers), 0), COALESCE(SUM(d.from_releaser), 0), "  # noqa: S608
            f"COUNT(*) FROM p2p_delivered d{join}{dwhere}",
            tuple(dargs),
        ).fetchone()
        return P2PView(
            reports=reports,
            from_peers=int(row[0]),
            from_releaser=int(row[1]),
            downloads=int(row[2]),
        )

    def reported(self) -> dict[str, int]:
        """Device id -> reports against it (``fleetpush devices``)."""
        rows = self.conn.execute("SELECT device_id, COUNT(*) FROM p2p_bad GROUP BY device_id")
        return {r[0]: int(r[1]) for r in rows}


__all__ = ["PeerTracker"]
