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

    def reported(self) -> dict[str, int]:
        """Device id -> reports against it (``fleetpush devices``)."""
        rows = self.conn.execute("SELECT device_id, COUNT(*) FROM p2p_bad GROUP BY device_id")
        return {r[0]: int(r[1]) for r in rows}


__all__ = ["PeerTracker"]
