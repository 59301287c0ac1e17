"""Which releaser a device is live on: releaser liveness rows and device leases (issue 15, §2).

Several releasers share one PostgreSQL database; a device id must be live on
at most one of them, and every releaser must be able to say which one.

Two tables (server/schema.py):

- ``releasers``: one row per running releaser process (a fresh id each
  start), renewed every :data:`RENEW_INTERVAL` seconds with ``alive_until``
  :data:`ALIVE_FOR` seconds ahead: one write per releaser, not per device.
  A releaser killed outright (kill -9) stops renewing, and its leases count
  as free once ``alive_until`` passed.
- ``device_leases``: ``device_id`` (primary key), the ``releaser_id`` holding
  it and ``since`` (the taker's wall clock). A successful device handshake
  takes the lease in one upsert; the newest connection wins, as within one
  releaser (fleet.py), so a half-open link left on another releaser never
  keeps a device from its new one; "newest" is the taker's clock (a take
  never overwrites a newer one), so releaser hosts' clocks must agree to
  within :data:`CLOCK_SLACK` (NTP). A clean disconnect deletes the row (only
  if it still names this releaser); a clean shutdown deletes all of them.

The releaser that lost a device learns it without a query per device: every
:data:`POLL_INTERVAL` it reads the leases taken since its last look by
another releaser (one indexed range query on ``since``), and :func:`lost_links`
keeps those of its own live links, which it closes (``POLICY``, 1014:
specs/PROTOCOL.md §5.5 "Takeover").
The window reaches :data:`CLOCK_SLACK` seconds back, for clocks that differ
between releaser hosts; rows seen twice are harmless (the link is gone).

Writes go through the releaser's WriteBehind (one transaction per 100 ms for
all handshakes, not one commit each); liveness and the poll are single
autocommit statements. The same SQL runs on SQLite, where one releaser owns
the file: the rows then only feed the views (``devices`` shows ``releaser``),
at one batched row write per handshake and disconnect.

Nothing here raises: a database error is logged and tried again on the next
round (the rows are the truth, and the next round catches up).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Final

import attrs
import trio

from . import db

log = logging.getLogger("fleetpush.server")

#: Seconds between two renewals of this releaser's ``alive_until``.
RENEW_INTERVAL: Final = 2.0
#: How far ahead each renewal sets ``alive_until``: a killed releaser's
#: devices count as free (in the views) at most this long after its death.
ALIVE_FOR: Final = 10.0
#: Seconds between two looks for devices another releaser took from us.
POLL_INTERVAL: Final = 1.0
#: How far the poll's window reaches before the last look: the most the
#: releaser hosts' clocks may differ (NTP keeps them far closer).
CLOCK_SLACK: Final = 5.0
#: A releaser row dead this long is deleted, with any lease still naming it.
FORGET_DEAD_AFTER: Final = 3600.0


def new_releaser_id() -> str:
    """A fresh id for one releaser process and start: a restart is a new releaser.

    The one id of a releaser in the lease rows, the bus (cluster_bus.py) and
    the logs: host and pid for people, a token because two releasers may share
    a process (tests) and pids are reused.
    """
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def advertised_address(host: str, port: int) -> str:
    """What the views show for a releaser listening on ``host:port``."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class Taken:
    """A lease another releaser took: the device, and who holds it now."""

    device_id: str
    releaser_id: str
    address: str


def lost_links(taken: Iterable[Taken], live: Collection[str], me: str) -> list[Taken]:
    """The leases in ``taken`` that end one of this releaser's ``live`` links.

    A pure decision: the rows already say another releaser holds the device
    (newest connection wins), so our link to it is stale (half-open after a
    network change, or the device moved) and must close.
    """
    seen: set[str] = set()
    out = []
    for t in taken:
        if t.releaser_id != me and t.device_id in live and t.device_id not in seen:
            seen.add(t.device_id)
            out.append(t)
    return out


class LeaseStore:
    """The SQL of the two tables, for one releaser process (trio thread only)."""

    def __init__(self, conn: db.Connection, writer: db.WriteBehind, releaser_id: str) -> None:
        self.conn = conn
        self.writer = writer
        self.releaser_id = releaser_id

    def announce(self, address: str, now: float) -> None:
        """Write this releaser's row (at start). Raises the backend's errors."""
        self.conn.execute(
            "INSERT INTO releasers (releaser_id, address, started, alive_until)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (releaser_id) DO UPDATE"
            " SET address = excluded.address, alive_until = excluded.alive_until",
            (self.releaser_id, address, now, now + ALIVE_FOR),
        )

    def renew(self, now: float) -> None:
        """Push ``alive_until`` ahead. Raises the backend's errors."""
        self.conn.execute(
            "UPDATE releasers SET alive_until = ? WHERE releaser_id = ?",
            (now + ALIVE_FOR, self.releaser_id),
        )

    def take(self, device_id: str, now: float) -> None:
        """This releaser holds ``device_id`` from ``now`` (queued: next flush).

        Only over an older lease: each releaser's writes are queued, so the
        take of a link that already ended on A may be written after B's take
        of the device's newer link; the newer ``since`` wins, whichever lands
        last. (Seen once in 2,000 devices of scripts/failover_kill.py, before
        this condition: A's late take, then its drop, left no lease at all.)
        """
        self.writer.add(
            "INSERT INTO device_leases (device_id, releaser_id, since) VALUES (?, ?, ?)"
            " ON CONFLICT (device_id) DO UPDATE"
            " SET releaser_id = excluded.releaser_id, since = excluded.since"
            " WHERE device_leases.since <= excluded.since",
            (device_id, self.releaser_id, now),
        )

    def drop(self, device_id: str) -> None:
        """The device's link here ended: free its lease if it is still ours (queued)."""
        self.writer.add(
            "DELETE FROM device_leases WHERE device_id = ? AND releaser_id = ?",
            (device_id, self.releaser_id),
        )

    def taken_since(self, since: float) -> list[Taken]:
        """Leases another releaser took after ``since``. Raises the backend's errors."""
        rows = self.conn.execute(
            "SELECT l.device_id, l.releaser_id, COALESCE(r.address, l.releaser_id)"
            " FROM device_leases l LEFT JOIN releasers r ON r.releaser_id = l.releaser_id"
            " WHERE l.since > ? AND l.releaser_id <> ?",
            (since, self.releaser_id),
        ).fetchall()
        return [Taken(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def holders(self, device_ids: Collection[str], now: float) -> dict[str, str]:
        """The address of the live releaser holding each of ``device_ids`` (if any).

        One query for a page of devices; a lease of a releaser whose
        ``alive_until`` passed is free and not listed.
        """
        if not device_ids:
            return {}
        rows = self.conn.execute(
            "SELECT l.device_id, r.address FROM device_leases l"
            " JOIN releasers r ON r.releaser_id = l.releaser_id"
            " WHERE l.device_id IN (SELECT value FROM json_each(?)) AND r.alive_until > ?",
            (db.dumps(sorted(device_ids)), now),
        ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def release_all(self) -> None:
        """Clean shutdown: free every lease of ours and say we are gone."""
        self.writer.flush()  # the drops and takes queued before these
        self.conn.execute("DELETE FROM device_leases WHERE releaser_id = ?", (self.releaser_id,))
        self.conn.execute(
            "UPDATE releasers SET alive_until = 0 WHERE releaser_id = ?", (self.releaser_id,)
        )

    def forget_dead(self, now: float) -> int:
        """Delete releasers dead for FORGET_DEAD_AFTER and their leases; rows deleted."""
        cutoff = now - FORGET_DEAD_AFTER
        with db.transaction(self.conn):
            leases = self.conn.execute(
                "DELETE FROM device_leases WHERE releaser_id IN"
                " (SELECT releaser_id FROM releasers WHERE alive_until < ?)",
                (cutoff,),
            ).rowcount
            self.conn.execute("DELETE FROM releasers WHERE alive_until < ?", (cutoff,))
        return max(leases, 0)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    """The runner without a pool: the call on the trio thread."""
    return fn(*args)


@attrs.frozen(kw_only=True)
class LeaseContext:
    """What :func:`lease_loop` needs: the store, and how to reach and close live links."""

    store: LeaseStore
    address: str
    #: the device ids of this releaser's live links right now
    live: Callable[[], Collection[str]]
    #: start closing the live link of a device another releaser took (with
    #: this reason), without waiting: thousands may move at once
    close: Callable[[str, str], None]
    clock: Callable[[], float]
    #: the runner of the store's statements (db_calls.DbCalls.run): a worker
    #: thread on PostgreSQL, so a round trip never stalls the trio thread
    run: Callable[..., Awaitable[Any]] = _inline


def _lease_round(
    store: LeaseStore,
    address: str,
    now: float,
    *,
    announce: bool,
    renew: bool,
    forget: bool,
    since: float,
) -> list[Taken]:
    """The statements of one round of :func:`lease_loop` (run through its
    context's runner). Raises the backend's errors."""
    if announce:
        store.announce(address, now)
    elif renew:
        store.renew(now)
    if forget and (forgotten := store.forget_dead(now)):
        log.info("forgot %d leases of releasers gone for an hour", forgotten)
    return store.taken_since(since)


async def lease_loop(ctx: LeaseContext) -> None:
    """Announce this releaser, renew it, and close links other releasers took. Never returns."""
    store = ctx.store
    last_renew = last_forget = -1e18
    last_poll = ctx.clock()
    announced = False
    while True:
        now = ctx.clock()
        renew = announced and now - last_renew >= RENEW_INTERVAL
        forget = now - last_forget >= FORGET_DEAD_AFTER / 10
        if forget:
            last_forget = now  # a failed cleanup waits for its next turn, as before
        try:
            taken = await ctx.run(
                functools.partial(
                    _lease_round,
                    announce=not announced,
                    renew=renew,
                    forget=forget,
                    since=last_poll - CLOCK_SLACK,
                ),
                store,
                ctx.address,
                now,
            )
            if not announced or renew:
                announced = True
                last_renew = now
            last_poll = now
        except db.ERRORS as e:
            log.warning("device leases: %s (tried again in %.0f s)", e, POLL_INTERVAL)
            taken = []
        for t in lost_links(taken, ctx.live(), store.releaser_id):
            log.info("device %s moved to releaser %s: closing it here", t.device_id, t.address)
            ctx.close(t.device_id, f"the device connected to releaser {t.address}")
        await trio.sleep(POLL_INTERVAL)
