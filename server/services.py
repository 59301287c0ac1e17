"""What every handler of one running releaser shares: config, stores, event hub, caches.

:class:`Services` is built once by :func:`fleetpush.server.app.serve` and
passed to each handler as its first argument. It holds no connection: live
devices are reached through :attr:`Services.fleet` (fleet.py), and a
request's caller through the :class:`~.call.Call` the handler is given. So
this module imports neither the session, nor the listener, nor the handlers.

:class:`ChunkStreams` counts the ``get_chunks`` answers in flight, so that a
graceful stop can refuse new ones and wait for those running (see app.py).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio
from fleetpush.protocol import ErrorCode, RpcError
from fleetpush.protocol.errors import Conflict
from fleetpush.protocol.frames import BodyBudget
from fleetpush.protocol.keys import keyid
from fleetpush.protocol.messages import ReleaseInfo

from . import db, gc_policy, pg
from .artifacts import Artifacts, StoreOptions
from .chunks import ChunkCache, ManifestCache
from .cluster_bus import ClusterNode, join_cluster
from .config import ServerConfig
from .db_calls import DbCalls
from .deployments import Deployment, DeploymentStore
from .errors import ConfigError, ObjectStoreError
from .events import EventHub
from .fleet import Fleet
from .freshness import FreshnessSigner, load_timestamp_key
from .leases import LeaseStore, new_releaser_id
from .log_relay import LogRelay
from .metrics import FleetFigures, Metrics
from .p2p_tracker import PeerTracker
from .publish import record_release_keys, remove_stale_staging
from .push_core import deliver_push
from .quota import DiskGuard, RateLimits
from .registry import DeviceRegistry, PushStore
from .releases import PUSHABLE, ReleaseStore
from .rollout import Actions, Rollouts
from .roots import RootStore
from .scrub import Damage, Scrub, ScrubContext, ScrubTarget

log = logging.getLogger("fleetpush.server")

#: Seconds between two rounds of :meth:`Services.housekeeping_loop`.
HOUSEKEEPING_INTERVAL = 30.0


class ChunkStreams:
    """The chunk streams in flight, and whether new ones are still allowed (trio thread only)."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = trio.Event()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Count one stream for the duration of the block.

        Raises ``RpcError(UNAVAILABLE)`` once draining (specs/PROTOCOL.md §9.1).
        """
        if self.draining:
            raise RpcError(ErrorCode.UNAVAILABLE, "the releaser is shutting down")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def drain(self, grace_period: float) -> None:
        """Refuse new streams; wait for those in flight, at most ``grace_period`` seconds."""
        self.draining = True
        if not self.inflight:
            return
        log.info("waiting up to %.1fs for %d chunk stream(s)", grace_period, self.inflight)
        self._idle = trio.Event()
        with trio.move_on_after(grace_period):
            while self.inflight:
                await self._idle.wait()
                self._idle = trio.Event()


#: Bytes the partial large frames of all connections may hold at once. Each
#: holds at most ~5x what its peer sent (protocol/frames.py); past this, the
#: frame that wants more fails with bye 1009 and the rest are unaffected.
PARTIAL_FRAME_BUDGET: Final = 256 * 1024 * 1024


class Services:
    """State shared by every connection of one running releaser (trio thread only).

    Opening it opens the database, records the release keys for publishers in
    other processes, and removes staging dirs left by interrupted publishes.
    Raises ``DatabaseError``.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: where releases' files are: the data dir or an object store (artifacts.py)
        self.artifacts = Artifacts(
            config.data_dir,
            StoreOptions(
                endpoint=config.store_endpoint,
                region=config.store_region,
                timeout=config.store_timeout,
            ),
        )
        if config.store is not None:
            # Fail at start on a client that is not installed or a bad URL, not at
            # the first chunk; the store itself may be down: that is not checked.
            try:
                self.artifacts.resolve(config.store)
            except ObjectStoreError as e:
                raise ConfigError(f"store: {e}") from e
            log.info("release files may be read from the object store %s", config.store)
        self.conn = db.open_database(config.data_dir, config.database, config.database_pool)
        #: store calls off the trio thread on PostgreSQL, inline on SQLite (db_calls.py)
        self.calls = DbCalls(self.conn)
        if config.database is not None:
            # For `release publish --data-dir` in another process (db.DATABASE_FILE).
            db.record_database(config.data_dir, config.database)
        server_id = config.server_id or db.get_meta(self.conn, "server_id")
        if server_id is None:
            server_id = f"fp-{secrets.token_hex(8)}"
        db.set_meta(self.conn, "server_id", server_id)
        self.server_id = server_id
        record_release_keys(self.conn, config.release_keys, config.release_threshold)
        for path in remove_stale_staging(config.data_dir):
            log.warning("removed %s, left by an interrupted publish", path)
        self.writer = db.WriteBehind(self.conn, inline_flush=not self.calls.threaded)
        self.releases = ReleaseStore(self.conn, config.data_dir)
        #: the signed roots operators published (roots.py, specs/PROTOCOL.md §8.5)
        self.roots = RootStore(config.data_dir)
        #: freshness statements (freshness.py, §8.6); None without a timestamp key
        self.freshness = (
            FreshnessSigner(
                load_timestamp_key(config.timestamp_key),
                server_id,
                config.freshness_expiry,
                self.conn,
            )
            if config.timestamp_key is not None
            else None
        )
        latest = self.roots.latest()
        if self.freshness is not None and latest is not None:
            role = latest.root.timestamp
            if role is None or keyid(self.freshness.key) not in role.keys:
                log.warning(
                    "timestamp_key %s is not in the timestamp role of root version %d: "
                    "devices do not trust its statements, nor its pushes where the root "
                    "names other timestamp keys",
                    config.timestamp_key,
                    latest.root.version,
                )
        self.devices = DeviceRegistry(self.conn, self.writer)
        #: peer delivery's tables (p2p_tracker.py, §7.11)
        self.p2p = PeerTracker(self.conn)
        self.pushes = PushStore(self.conn, self.writer)
        self.events = EventHub(
            self.conn,
            history_limit=config.history_limit,
            queue_size=config.watch_queue,
            queue_bytes=config.watch_queue_bytes,
            writer=self.writer,
        )
        self.cache = ChunkCache(
            config.chunk_cache_bytes,
            config.max_disk_reads,
            stall_timeout=config.chunk_stall_timeout,
            wait_timeout=config.send_timeout,
            store_reads=config.max_store_reads,
        )
        self.manifests = ManifestCache()
        #: releases the background scrub found changed on disk (scrub.py)
        self.scrub = Scrub()
        #: authenticated device connections by device id
        self.fleet = Fleet()
        #: this releaser process, in the lease rows, the bus and the logs (issue 15)
        self.releaser_id = new_releaser_id()
        #: which releaser each device is live on, shared by all (leases.py, issue 15)
        self.leases = LeaseStore(self.conn, self.writer, self.releaser_id)
        self.chunk_streams = ChunkStreams()
        #: what partial frames of all connections may hold together (issue 10, item 3)
        self.frame_budget = BodyBudget(PARTIAL_FRAME_BUDGET)
        #: per-device rate limits on stored rows, and the low-disk mode (issue 10, item 2)
        self.rates = RateLimits()
        self.disk = DiskGuard(config.data_dir)
        self.started_monotonic = time.monotonic()
        #: operators following devices' app logs (app_remote.py)
        self.app_logs = LogRelay()
        #: Prometheus figures (metrics.py); served only with ``--metrics``.
        self.metrics = Metrics()
        #: deployments (§7.7.1): the store and the scheduler, told every event
        self.deployments = DeploymentStore(self.conn)
        self.rollouts = Rollouts(
            self.deployments,
            Actions(
                start=self._start_devices,
                online=self._online,
                set_release=self._set_release,
                release_status=self._release_status,
                emit=self.events.emit,
            ),
            run=self.calls.run,
        )
        self.events.listen(self.rollouts.observe)
        #: the other releasers on the same PostgreSQL (cluster_bus.py); None on SQLite
        self.cluster: ClusterNode | None = None
        if isinstance(self.conn, pg.PgConnection):
            self.cluster = join_cluster(
                self.conn,
                self.conn.url,
                releaser_id=self.releaser_id,
                flush=self.writer.flush,
                hub=self.events,
                fleet=self.fleet,
                pushes=self.pushes,
                rollouts=self.rollouts,
                run=self.calls.run,
            )

    # --- what the deployment scheduler may do (rollout.Actions) ----------------------

    async def _start_devices(
        self, dep: Deployment, device_ids: list[str], ready: Callable[[], Awaitable[bool]]
    ) -> tuple[str, dict[str, str]] | None:
        """Push the deployment's release to ``device_ids`` (push_core.py).

        Returns the push id and the devices skipped with why (forgotten,
        no longer accepted, another app), or None if ``ready()`` (awaited
        last, right before the push) says not to. The reads run through the
        runner (db_calls.py); the push itself, on the trio thread. Raises
        NotFound (the release is gone), Conflict (it is not pushable: paused,
        revoked).
        """
        record = await self.calls.run(self.releases.get, dep.app, dep.version)
        if record.status not in PUSHABLE:
            raise Conflict(f"{dep.app} {dep.version} is {record.status}")
        skipped: dict[str, str] = {}
        targets: list[str] = []
        rows = await self.calls.run(self.devices.get_many, device_ids)
        for device_id in device_ids:
            row = rows.get(device_id)
            if row is None:
                skipped[device_id] = "the device was forgotten"
            elif row["enrollment"] != "accepted":
                skipped[device_id] = f"the device is {row['enrollment']}"
            elif row["app"] != dep.app:
                skipped[device_id] = f"the device now runs {row['app']!r}"
            else:
                targets.append(device_id)
        if not targets:
            return "", skipped
        if not await ready():
            return None
        result = deliver_push(
            self,
            operator=f"deployment {dep.deployment_id}",
            app=dep.app,
            version=record.version,
            mode="force",
            restart=record.restart if dep.restart is None else dep.restart,
            selector={"deployment": dep.deployment_id},
            targets=targets,
            now=time.time(),
            extra={"deployment_id": dep.deployment_id},
            announce=None if self.cluster is None else self.cluster.announce_push,
        )
        return result.push_id, skipped

    def _online(self, device_id: str) -> bool:
        live = self.fleet.get(device_id)
        if live is None and self.cluster is not None:
            # Connected to another releaser: the push reaches it through the bus.
            return self.cluster.holder(device_id) is not None
        return live is not None and live.can_take_commands and live.has_room

    @property
    def leads(self) -> bool:
        """True if this releaser runs the singleton loops (always, but for a non-leader
        of several releasers on one PostgreSQL)."""
        return self.cluster is None or self.cluster.leader

    async def _release_status(self, app: str, version: str) -> str | None:
        return await self.calls.run(self.releases.status_of, app, version)

    async def _set_release(self, app: str, version: str, status: str, operator: str) -> str:
        previous, info = await self.calls.run(self._set_status, app, version, status, operator)
        if previous != info.status:
            self.events.emit(
                "release_status",
                None,
                {"app": app, "version": info.version, "status": info.status, "operator": operator},
            )
        return previous

    def _set_status(
        self, app: str, version: str, status: str, operator: str
    ) -> tuple[str, ReleaseInfo]:
        """The release's status before and after (statements only: db_calls.py)."""
        previous = self.releases.status_of(app, version) or "?"
        return previous, self.releases.set_status(app, version, status, operator)

    async def fleet_figures(self) -> FleetFigures:
        """The fleet gauges' values (metrics.refresh_loop): the counts (GROUP BY
        over every device) read through the runner (db_calls.py), the links here."""
        by_version, by_state = await self.calls.run(self.devices.counts)
        return FleetFigures(
            connected=len(self.fleet),
            by_version=by_version,
            by_state=by_state,
            deliveries=await self.calls.run(self.pushes.delivery_counts),
            deployments=await self.calls.run(self.deployments.counts_by_state),
        )

    def close(self) -> None:
        """Free our device leases, write what is queued and close the database."""
        try:
            self.leases.release_all()
        except db.ERRORS as e:  # they expire with our releaser row (leases.ALIVE_FOR)
            log.warning("freeing the device leases failed: %s", e)
        try:
            self.writer.flush()
        finally:
            self.conn.close()

    async def housekeeping_loop(self) -> None:
        """Every HOUSEKEEPING_INTERVAL: remove staging dirs of publishers that died.

        Off the trio thread: a killed publish may leave gigabytes to delete
        (issue 10, item 13; publish.remove_stale_staging never raises).
        """
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            removed = await trio.to_thread.run_sync(remove_stale_staging, self.config.data_dir)
            for path in removed:
                log.warning("removed %s, left by an interrupted publish", path)
            if self.config.event_retention > 0 and self.leads:
                try:
                    pruned = await self.calls.run(
                        self.events.prune_older_than, time.time() - self.config.event_retention
                    )
                except Exception:
                    log.exception("pruning old events failed")
                else:
                    if pruned:
                        log.info("pruned %d events older than event_retention", pruned)

    async def scrub_loop(self) -> None:
        """Check the store against its manifests, ``scrub_rate`` bytes/s (scrub.py)."""
        await self.scrub.run(
            ScrubContext(
                targets=self._scrub_targets,
                report=self._report_damage,
                rate=self.config.scrub_rate,
                interval=self.config.scrub_interval,
            )
        )

    def _scrub_targets(self) -> list[ScrubTarget]:
        targets = []
        skipped = 0
        for info in self.releases.list():
            record = self.releases.find(info.app, info.version)
            if record is None or record.status == "revoked":
                continue
            if record.remote:
                # The scrub reads the data dir only: re-reading an object store
                # costs egress per pass, and the device's per-chunk check
                # (§7.4) refuses a tampered object anyway (issue 15).
                skipped += 1
                continue
            manifest = self.manifests.get(str(record.dir), record.signed.signed)
            targets.append(
                ScrubTarget(
                    app=record.app, version=record.version, dir=record.dir, manifest=manifest
                )
            )
        if skipped:
            log.info(
                "scrub: %d release(s) in an object store skipped (devices verify every chunk)",
                skipped,
            )
        return targets

    def _report_damage(self, damage: Damage) -> None:
        log.error(
            "release %s %s is damaged on disk and no longer served: %s "
            "(republish it from its source)",
            damage.app,
            damage.version,
            damage.message(),
        )
        self.events.emit(
            "scrub_failed",
            None,
            {
                "app": damage.app,
                "version": damage.version,
                "path": damage.path,
                "chunk": damage.chunk,
                "error": damage.why,
            },
        )

    async def trim_loop(self) -> None:
        """Return freed heap memory and SQLite's page cache now and then (gc_policy).

        Does nothing unless ``fleetpush server`` installed the process policy.
        """
        policy = gc_policy.POLICY
        while True:
            await trio.sleep(gc_policy.TRIM_INTERVAL)
            now = time.monotonic()
            if policy.trim_due(now):
                # SQLite's page cache first (on this thread: the connection is
                # used from here only), so that the trim returns its pages too.
                db.release_memory(self.conn)
                await trio.to_thread.run_sync(policy.trim, now)

    async def flush_loop(self) -> None:
        """Commit queued writes every FLUSH_INTERVAL (see db.WriteBehind)."""
        while True:
            await trio.sleep(db.FLUSH_INTERVAL)
            try:
                await self.calls.run(self.writer.flush)
            except Exception:
                log.exception("writing queued database rows failed")
