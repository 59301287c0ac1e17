"""Several releasers, one fleet: the LISTEN/NOTIFY bus (issue 15, part 2; specs/SCALE.md).

PostgreSQL mode only (this module and psycopg are never imported on SQLite).
Each releaser process has a releaser id and one dedicated LISTEN connection
(:class:`ListenLink`), used by one worker thread at a time in slices of
:data:`POLL_TIMEOUT` seconds, so a cancellation never waits longer than one
slice and the stores' connection is never shared with it. Through it:

- notifications from the others arrive (ids only: cluster_batch.py): their
  events are read from ``events`` and handed to the local hub as remote
  events (watchers, the deployment scheduler), their pushes' queued targets
  that are connected *here* are woken, as a re-offer on connect would;
- the leader is chosen: the releaser holding the session-level advisory
  lock :data:`LEADER_KEY` on this connection drives deployments and the
  other singleton loops; when it dies its connection closes, the lock is
  free, and the next poll of another releaser (within ~POLL_TIMEOUT) takes it.

What this releaser writes is announced by :meth:`ClusterNode.send_loop`,
batched: one NOTIFY per :data:`~.cluster_batch.BATCH_INTERVAL` at most, after
the write-behind rows were committed (a notification never names a row that
is not there yet). The rows are the truth: on (re)connect and every
:data:`CATCH_UP_INTERVAL` the recent events and queued targets are read again
(:meth:`ClusterNode.catch_up`), so a lost notification costs latency, not
an event or a push.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import attrs
import trio
from fleetpush.protocol.messages import Event

from . import cluster_rows as rows
from . import db
from .cluster_batch import (
    BATCH_INTERVAL,
    BusPayloadError,
    Note,
    Outbox,
    Presence,
    Seen,
    SeqBlocks,
    SeqUnavailable,
    decode,
    encode,
)
from .cluster_calls import ForwardedCalls
from .errors import ServerError
from .events import EventHub
from .fleet import DeviceLink, Fleet
from .pg import CONNECT_TIMEOUT_S, MAX_BACKOFF, MIN_BACKOFF, redact
from .push_fanout import fan_out, shared_command
from .registry import PendingCommand, PushStore
from .rollout import Rollouts

log = logging.getLogger("fleetpush.server.cluster")

#: The leader's session-level advisory lock ("fpld" in ASCII).
LEADER_KEY: Final = 0x66706C64
#: Seconds one wait for notifications lasts (the bound on a leader takeover
#: after the old leader's connection closed, and on a cancellation).
POLL_TIMEOUT: Final = 0.5
#: Seconds between two safety-net catch-ups from the rows.
CATCH_UP_INTERVAL: Final = 10.0
#: How far back a catch-up reads before the last one: the write-behind delay,
#: a notification in flight, clocks of releasers that differ a little (NTP).
CATCH_UP_MARGIN: Final = 30.0
#: How far back the start reads ``connected`` events to learn who holds what.
PRESENCE_WINDOW: Final = 24 * 3600.0


class BusUnavailable(ServerError):
    """The LISTEN connection failed or could not be opened."""


@attrs.frozen
class Polled:
    payloads: list[str]
    #: the connection was (re)opened by this poll: catch up from the rows
    fresh: bool
    leader: bool


class ListenLink:
    """The dedicated LISTEN connection (one thread at a time, never the trio thread)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        #: the connection's application_name: pg_stat_activity shows which
        #: releaser holds the leader lock (the id names host and pid)
        self.name = name
        self._conn: Any = None
        self.leader = False

    def poll(self, timeout: float) -> Polled:
        """Notifications within ``timeout`` s, trying for the lead. Raises BusUnavailable."""
        import psycopg

        fresh = False
        try:
            if self._conn is None or self._conn.closed:
                self.leader = False
                self._conn = psycopg.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    application_name=self.name[:63],
                )
                self._conn.execute(f"LISTEN {rows.CHANNEL}")
                fresh = True
            conn = self._conn
            if not self.leader:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_KEY,)).fetchone()
                self.leader = bool(row[0])
            payloads = [n.payload for n in conn.notifies(timeout=timeout, stop_after=1)]
            if payloads:  # a burst: take what else is already there
                payloads += [n.payload for n in conn.notifies(timeout=0.01)]
        except psycopg.Error as e:
            self.close()
            raise BusUnavailable(" ".join(str(e).split()) or type(e).__name__) from e
        return Polled(payloads=payloads, fresh=fresh, leader=self.leader)

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend serving this connection, if open (for tests, operators)."""
        conn = self._conn
        return None if conn is None or conn.closed else int(conn.info.backend_pid)

    def close(self) -> None:
        self.leader = False
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    """The runner without a pool: the call on the trio thread."""
    return fn(*args)


@attrs.frozen(kw_only=True)
class NodeDeps:
    """What the bus may do to the rest of the releaser (wired by services.py)."""

    #: the stores' connection: rows are read and NOTIFYs sent through it
    conn: db.Connection
    #: commit the write-behind rows (before announcing them)
    flush: Callable[[], None]
    #: hand another releaser's event to the local hub (watchers, scheduler)
    deliver: Callable[[Event], None]
    #: look for queued pushes of a device if it is connected here
    wake: Callable[[str], None]
    #: hand these queued commands to the devices' links here, as a local push does
    hand_over: Callable[[list[tuple[str, PendingCommand]]], None]
    #: this releaser became (True) or stopped being (False) the leader
    lead: Callable[[bool], None]
    clock: Callable[[], float] = time.time
    #: the runner of the statements (db_calls.DbCalls.run): on PostgreSQL a
    #: worker thread on a pool connection; what it runs touches no state of
    #: this class (specs/SCALE.md §4.1)
    run: Callable[..., Awaitable[Any]] = _inline


class ClusterNode:
    """This releaser's place on the bus (trio thread only, but for ListenLink.poll)."""

    def __init__(self, url: str, releaser_id: str, deps: NodeDeps) -> None:
        self.url = url
        self.releaser_id = releaser_id
        self.deps = deps
        self.outbox = Outbox(releaser_id)
        self.seen = Seen()
        self.presence = Presence()
        self.leader = False
        self._link = ListenLink(url, f"fleetpush-bus {releaser_id}")
        self._limiter = trio.CapacityLimiter(1)
        self._caught_up = deps.clock()
        self.received = 0
        self.delivered = 0
        #: what this releaser's ``connected`` events carry (EventHub.stamp)
        self.stamp = {"releaser": releaser_id}
        #: when a push id / a forwarded call id was last announced on its own
        self._last_notify = {"push": float("-inf"), "call": float("-inf")}
        #: pushes announced before their event (announce_push): not announced twice,
        #: a second hand-over on the far side could write a command twice
        self._announced: collections.deque[str] = collections.deque(maxlen=64)
        #: operator calls forwarded to or from this releaser (cluster_calls.py)
        self.calls = ForwardedCalls(
            deps.conn, releaser_id, self.announce_call, deps.clock, run_db=deps.run
        )
        #: the other releasers' listen addresses, from their ``connected`` events
        self.addresses: dict[str, str] = {}

    def set_address(self, host: str, port: int) -> None:
        """This releaser's listen address, told to the others in its events."""
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()  # a wildcard names no machine
        self.stamp["releaser_address"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- what the releaser tells the bus ---------------------------------------------

    def event_written(self, event: Event) -> None:
        """The hub persisted ``event`` (announced with the next batch).

        A ``push`` event (push_core.deliver_push: an operator's push or a
        deployment's start) announces its push id too: the others wake their
        links among its queued targets.
        """
        self.seen.add(event.seq)
        self.outbox.add_event(event.seq)
        push_id = str(event.data.get("push_id") or "") if event.kind == "push" else ""
        if push_id and push_id not in self._announced:
            self._announce_push(push_id)

    def announce_push(self, push_id: str) -> None:
        """Announce a push whose rows are committed, before this releaser's own
        fan-out (push_core.deliver_push): the others hand it to their links
        meanwhile (issue 15 part 4); its ``push`` event does not announce it again."""
        self._announced.append(push_id)
        self._announce_push(push_id)

    def _announce_push(self, push_id: str) -> None:
        """Announce a push at once, unless another was in the last BATCH_INTERVAL.

        Its rows are committed already (PushStore.create is a transaction), and
        waiting for the batch meant waiting behind this releaser's own hand-off
        to its links: B's devices got a push 0.85 s after A's (2 x 2000,
        scripts/cluster_bench.py). Pushes come at operator or scheduler pace;
        the bound of one NOTIFY per interval still holds.
        """
        self._announce_now("push", push_id)

    def announce_call(self, call_id: str) -> None:
        """Announce a forwarded call's row (request or answer) at once, as a push is.

        An operator waits on the far side: each way costs at most one
        BATCH_INTERVAL (only when another call was announced in the last one),
        never a batch per hop (specs/SCALE.md §5, "forwarded calls").
        """
        self._announce_now("call", call_id)

    def _announce_now(self, kind: str, item: str) -> None:
        """One NOTIFY for ``item`` now, unless one of its ``kind`` went out within
        BATCH_INTERVAL: then (or if the NOTIFY fails) it rides the next batch."""
        batch = self.outbox.add_push if kind == "push" else self.outbox.add_call
        now = time.monotonic()
        if now - self._last_notify[kind] < BATCH_INTERVAL:
            batch(item)
            return
        self._last_notify[kind] = now
        if kind == "push":
            note = Note(origin=self.releaser_id, pushes=(item,))
        else:
            note = Note(origin=self.releaser_id, calls=(item,))
        payload = encode(note)
        try:
            rows.send_notify(self.deps.conn, payload)
        except db.ERRORS as e:
            log.warning("cluster bus: announcing %s %s failed (batched again): %s", kind, item, e)
            batch(item)
            return
        self.outbox.figures.notifies += 1
        self.outbox.figures.ids += 1
        self.outbox.figures.payload_bytes += len(payload)

    @property
    def link(self) -> ListenLink:
        return self._link

    def holder(self, device_id: str) -> str | None:
        """The other live releaser holding ``device_id``'s link, or None."""
        return self.presence.where(device_id, self.deps.clock())

    # --- the tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, announce and catch up until cancelled."""
        try:
            await self._learn_presence()
        except db.ERRORS as e:
            log.warning("cluster: cannot read who holds which device yet: %s", e)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.send_loop)
                nursery.start_soon(self._catch_up_loop)
                await nursery.start(self.calls.serve)
                task_status.started()
                await self._listen_loop()
        finally:
            self._link.close()

    async def _listen_loop(self) -> None:
        backoff = MIN_BACKOFF
        down = False
        while True:
            try:
                polled = await trio.to_thread.run_sync(
                    self._link.poll, POLL_TIMEOUT, limiter=self._limiter
                )
            except BusUnavailable as e:
                self._set_leader(False)
                if not down:
                    log.warning(
                        "cluster bus: PostgreSQL at %s lost: %s; reconnecting with backoff",
                        redact(self.url),
                        e,
                    )
                    down = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if down:
                log.warning("cluster bus: PostgreSQL at %s reconnected", redact(self.url))
                down = False
            backoff = MIN_BACKOFF
            if polled.fresh:
                await self.catch_up()
            self._set_leader(polled.leader)
            await self._receive(polled.payloads)

    async def send_loop(self) -> None:
        """Announce what this releaser wrote, one batch per BATCH_INTERVAL at most."""
        failing = False
        while True:
            await trio.sleep(BATCH_INTERVAL)
            flush = bool(self.outbox)
            payloads = self.outbox.take(self.deps.clock())
            try:
                if flush or payloads:
                    await self.deps.run(self._announce, flush, payloads)
            except db.ERRORS as e:
                # The others catch up from the rows (CATCH_UP_INTERVAL).
                if not failing:
                    log.warning("cluster bus: a notification was not sent: %s", e)
                failing = True
            else:
                failing = False

    def _announce(self, flush: bool, payloads: Sequence[str]) -> None:
        """Statements only (run through deps.run). Raises ``db.ERRORS``."""
        if flush:
            self.deps.flush()  # the rows first: a notification names committed rows
        for payload in payloads:
            rows.send_notify(self.deps.conn, payload)

    async def _catch_up_loop(self) -> None:
        while True:
            await trio.sleep(CATCH_UP_INTERVAL)
            await self.catch_up()
            if self.leader:
                try:
                    await self.deps.run(self.calls.trim)
                except db.ERRORS as e:
                    log.warning("cluster: trimming old forwarded calls failed: %s", e)

    # --- receiving -----------------------------------------------------------------------

    async def _receive(self, payloads: Sequence[str]) -> None:
        """Act on one poll's notifications: every push first, then calls, then events.

        A deployment's start announces thousands of events around its push
        (deployment_device, command_sent); reading and delivering them first
        delayed the push to this releaser's devices (issue 15 part 4,
        scripts/cluster_bench.py). Events are for observers, and the rows hold
        all of it (a missed step is caught up from the tables).
        """
        notes: list[Note] = []
        for payload in payloads:
            try:
                note = decode(payload)
            except BusPayloadError as e:
                log.warning("cluster bus: %s", e)
                continue
            if note.origin == self.releaser_id:
                continue
            self.received += 1
            self.presence.heard(note.origin, self.deps.clock())
            notes.append(note)
        pushes = list(dict.fromkeys(p for note in notes for p in note.pushes))
        calls = list(dict.fromkeys(c for note in notes for c in note.calls))
        try:
            if pushes:
                self.deps.hand_over(
                    await self.deps.run(rows.queued_commands, self.deps.conn, pushes)
                )
            if calls:
                await self.calls.notified(calls)
            for note in notes:
                await self._deliver([s for s in note.events if s not in self.seen], note.origin)
        except db.ERRORS as e:
            log.warning("cluster bus: reading notified rows failed (caught up later): %s", e)

    async def _deliver(self, seqs: list[int], origin: str | None) -> None:
        if not seqs:
            return
        for event in await self.deps.run(rows.load_events, self.deps.conn, seqs):
            if not self.seen.add(event.seq):
                continue
            data = event.data if isinstance(event.data, dict) else {}
            holder = str(data.get("releaser") or origin or "?")
            if data.get("releaser_address"):
                self.addresses[holder] = str(data["releaser_address"])
            self.presence.event(holder, event.kind, event.device_id)
            self.delivered += 1
            self.deps.deliver(event)

    async def catch_up(self) -> None:
        """Read again what changed since the last catch-up (less a margin); never raises."""
        now = self.deps.clock()
        since = self._caught_up - CATCH_UP_MARGIN
        try:
            found, queued = await self.deps.run(self._changed_since, since)
            await self._deliver([s for s in found if s not in self.seen], None)
            for device_id in queued:
                self.deps.wake(device_id)
            await self.calls.catch_up()
        except db.ERRORS as e:
            log.warning("cluster: catching up from the rows failed (tried again): %s", e)
            return
        self._caught_up = now

    def _changed_since(self, since: float) -> tuple[list[int], list[str]]:
        """Event seqs and devices with queued pushes since ``since`` (statements
        only, run through deps.run). Raises ``db.ERRORS``."""
        self.deps.flush()
        return (
            list(rows.event_seqs_since(self.deps.conn, since)),
            list(rows.queued_since(self.deps.conn, since)),
        )

    async def _learn_presence(self) -> None:
        since = self.deps.clock() - PRESENCE_WINDOW
        found = await self.deps.run(rows.presence_events, self.deps.conn, since)
        for device_id, kind, holder in found:
            if holder and holder != self.releaser_id:
                self.presence.event(holder, kind, device_id)

    def _set_leader(self, leader: bool) -> None:
        if leader == self.leader:
            return
        try:
            self.deps.lead(leader)  # a new leader reads the scheduler's state from the rows
        except db.ERRORS as e:
            # Not leading yet: the next poll (still holding the lock) tries again.
            log.warning("cluster: taking the lead failed, retrying: %s", e)
            self.deps.lead(False)
            return
        self.leader = leader
        if leader:
            log.info("cluster: releaser %s leads (deployments, trimming)", self.releaser_id)
        else:
            log.warning("cluster: releaser %s no longer leads", self.releaser_id)


def join_cluster(
    conn: db.Connection,
    url: str,
    *,
    releaser_id: str,
    flush: Callable[[], None],
    hub: EventHub,
    fleet: Fleet,
    pushes: PushStore,
    rollouts: Rollouts,
    run: Callable[..., Awaitable[Any]] | None = None,
) -> ClusterNode:
    """Make this releaser one of several on the PostgreSQL database at ``url``.

    Event seqs come from the shared sequence, persisted events are announced,
    and deployments are scheduled only while this releaser leads (none until
    its first poll took the lock). Raises ``db.DatabaseError``.
    """
    try:
        rows.ensure_event_sequence(conn)
    except db.ERRORS as e:
        raise db.DatabaseError(f"cannot create the event sequence in {redact(url)}: {e}") from e

    def wake(device_id: str) -> None:
        link = fleet.get(device_id)
        if link is not None:
            link.wake()

    def hand_over(commands: list[tuple[str, PendingCommand]]) -> None:
        # As push_core.deliver_push does for its own targets: the command encoded
        # once per push and written straight to each idle link (push_fanout.fan_out,
        # Peer.request_nowait), else into the link's outbox; the row marked sent.
        # Through each link's delivery task, a remote push to 5,000 devices woke
        # 5,000 trio tasks first (issue 15 part 4, scripts/cluster_bench.py).
        now = time.time()
        by_push: dict[str, list[tuple[str, PendingCommand]]] = {}
        for device_id, cmd in commands:
            by_push.setdefault(cmd.push_id, []).append((device_id, cmd))
        for found in by_push.values():
            hand_over_push(dict(found), now)

    def hand_over_push(cmds: dict[str, PendingCommand], now: float) -> None:
        first = next(iter(cmds.values()))
        shared = shared_command(first.push_id, first.app, first.version, first.mode, first.restart)
        online: dict[str, DeviceLink] = {}
        for device_id in cmds:
            link = fleet.get(device_id)
            if link is None:
                continue
            if link.can_take_commands and link.has_room:
                online[device_id] = link
            else:
                link.wake()

        def send_now(device_id: str, link: DeviceLink) -> bool:
            return link.send_command_now(cmds[device_id].target_id, shared)

        def offer(device_id: str, link: DeviceLink) -> bool:
            return link.offer_command(cmds[device_id])

        fan = fan_out(list(online), online, send_now, offer)
        for device_id in fan.sent:
            pushes.mark(cmds[device_id].target_id, "sent", "", now)
        for device_id in fan.queued:
            online[device_id].wake()

    node = ClusterNode(
        url,
        releaser_id,
        NodeDeps(
            conn=conn,
            flush=flush,
            deliver=hub.deliver,
            wake=wake,
            hand_over=hand_over,
            lead=rollouts.lead,
            run=run or _inline,
        ),
    )

    def take_block() -> int:
        try:
            return rows.take_seq_block(conn)
        except db.ERRORS as e:
            raise SeqUnavailable(f"no event seq block: {e}") from e

    hub.next_seq = SeqBlocks(take_block, time.monotonic)
    hub.shared_seqs = True
    hub.on_persist = node.event_written
    hub.stamp = node.stamp
    rollouts.lead(False)
    return node
