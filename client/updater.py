"""The device updater: check, verify, download, stage, apply, trial, commit.

Embedding it takes a few lines::

    updater = Updater(UpdaterConfig.from_toml("agent.toml"), can_update=lambda: not busy)
    async with trio.open_nursery() as nursery:
        await nursery.start(updater.run)
        ...                      # the app
        updater.confirm()        # once the app is healthy after an update

or ``handle = Updater(config).start_in_thread()`` for an app that is not trio.

What it guarantees (issue 4, specs/PROTOCOL.md §7-8):

* nothing is written before the manifest passes the trust rules, and the
  sequence high-water mark is persisted atomically right after (state.py),
  so an older manifest is refused after a restart too;
* downloads are chunk-verified and resumable (download.py);
* applying is done by the install engine in *apply mode* (``os.execv`` into
  ``python -m fleetpush.client.applymode``, then back into the app with the
  saved argv), or, under ``fleetpush agent``, between stopping and starting
  the child (agent.py supplies its own :class:`Host`);
* a new version is on trial until confirmed (``confirm()``, the health
  command, or ``confirm_after`` seconds survived); otherwise it is rolled
  back, marked bad and reported;
* the releaser being unreachable never stops the app: every network wait has
  a deadline and every failure is logged and reported, not raised into the
  app's nursery.

Every step is reported as ``update_progress``; the outcome of each update
(staged, applied, committed, rolled back, failed) is also appended to the
persisted history and flushed to the releaser after each reconnect, so a kill
or a re-exec never loses it.

This module holds :class:`Updater`, the orchestrator and public face: it
composes the steps, holds the public API, reads the ``update`` sequence top to
bottom (check, stage, wait until allowed, apply) and runs it all (``run``,
``connected``). The steps live in their own modules; each is given the
:class:`UpdateContext` (context.py: config, layout, trust root, state store,
reporter, link, spawner) or plain callables, never the Updater, and none
imports this module (tests/architecture/test_architecture_layers.py):

* update_check.py: asking the releaser, the trust rules, :class:`UpdateInfo`;
* update_stage.py: downloading and staging a trusted release;
* forced_push.py: pushed updates persisted, retried and resumed;
* commands.py: the decisions on ``__force_update__``/``__apply_update__``;
* command_runner.py: acting on those decisions (persist, answer, run);
* periodic.py: the periodic checks, switched and timed at run time;
* startup.py: recovery, the trial and a staged update settled at start;
* trial_watch.py: the trial of a new version, commit or rollback (also the agent's);
* reporting.py: ``update_progress`` and the outcome history;
* hosts.py: :class:`Host` and the embedded :class:`ReexecHost`;
* thread_handle.py: :class:`ThreadHandle`, for apps that are not trio.

The names defined there that other code imports from this module
(:class:`UpdateInfo`, :class:`Host`, :data:`PENDING_PUSH`...) are re-exported
here (``__all__``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from functools import reduce
from typing import Any

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError, RpcError, TrustError
from fleetpush.protocol.frames import PROTOCOL_VERSION
from fleetpush.protocol.messages import Ack, Hello, UpdateCommand, UpdateProgress
from fleetpush.protocol.trust import VerifiedManifest

from fleetpush.net.tls import ClientTls

from . import freshness, repair, update_check, update_stage
from .activity import ActivityBoard
from .activity_gate import ActivityGate, DeferredReports, OnPending, still_staged
from .activity_policy import Verdict, Window
from .app_remote import RemoteApp, SupervisedApp
from .command_runner import CommandRunner
from .commands import PENDING_PUSH
from .config import UpdaterConfig
from .context import Spawner, StateStore, UpdateContext
from .device_ops import AppControl, serve_control
from .download import DownloadResult
from .download import capabilities as download_capabilities
from .errors import UpdateRefused
from .forced_push import ForcedPushes, pending_push
from .health import start_health
from .hosts import Host, ReexecHost
from .layout import StateLayout
from .owner import OwnerLock
from .p2p_agent import DeviceP2P, activity_busy
from .periodic import PeriodicChecks
from .reporting import OutcomeReporter
from .roots import TrustedRoots
from .session import ReleaserLink, Unreachable, load_or_create_device_key
from .startup import startup as settle_at_start
from .startup import watch_trial
from .state import StagedInfo, update_state
from .thread_handle import ThreadHandle
from .trial_watch import TrialWatch
from .update_check import UpdateInfo
from .update_stage import PROGRESS_INTERVAL

log = logging.getLogger("fleetpush.client.updater")


def in_window(window: str | None, now: datetime) -> bool:
    """True if ``now`` (local time) is inside the daily ``HH:MM-HH:MM`` window."""
    return window is None or Window.parse(window).contains(now)


class Updater:
    """The device side of fleetpush (see the module docstring)."""

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        on_update_available: Callable[[UpdateInfo], object] | None = None,
        on_progress: Callable[[UpdateProgress], object] | None = None,
        can_update: Callable[[], bool] | None = None,
        on_update_pending: OnPending | None = None,
        host: Host | None = None,
        tls: ClientTls | None = None,
        app: SupervisedApp | None = None,
    ) -> None:
        self.config = config
        self.on_update_available = on_update_available
        self.can_update = can_update
        self.host: Host = host or ReexecHost()
        # Corrupt state files are repaired before anything reads them, so the
        # app always starts (issue 10, item 12; repair.py).
        repairs = repair.repair(
            config.state_dir,
            config.app_root,
            app=config.app,
            version=config.version,
            device_id=config.device_id,
        )
        for line in repairs:
            log.warning("repaired: %s", line)
        self.key = load_or_create_device_key(config.state_dir)
        self.session = ReleaserLink(
            config,
            self.key,
            hello=self._hello,
            on_command=self._on_command,
            on_connected=self._on_connected,
            tls=tls,
            remote_app=RemoteApp(app),
        )
        #: the device state: read here, changed only through the store.
        self.store = StateStore.open(config)
        if repairs:  # reported to the releaser as history entries (§7.6.1)
            now = time.time()
            self.store.state = update_state(
                config.state_dir,
                lambda s: reduce(
                    lambda acc, line: acc.record(now, "repaired", acc.installed_version, line),
                    repairs,
                    s,
                ),
            )
        self._reporter = OutcomeReporter(config.app, self.store, self.session, on_progress)
        self._spawner = Spawner()
        #: what every step is given (context.py); none of them holds this Updater.
        self.ctx = UpdateContext(
            config=config,
            layout=StateLayout.of(config.state_dir),
            roots=TrustedRoots.open(config),
            store=self.store,
            reporter=self._reporter,
            link=self.session,
            spawner=self._spawner,
        )
        if config.p2p:  # off by default (§7.11)
            self.ctx = attrs.evolve(self.ctx, p2p=DeviceP2P.for_ctx(self.ctx, self.session.key))
        #: the outcome of the last operations.
        self.last_info: UpdateInfo | None = None
        self.last_download: DownloadResult | None = None
        self.last_error: str | None = None
        self._busy_version: str | None = None
        self.pushes = ForcedPushes(
            self.ctx, stage=self._stage, update=self.update, on_error=self._failed
        )
        #: the releaser's commands, decided in commands.py (command_runner.py).
        self.commands = CommandRunner(
            self.ctx,
            self.pushes,
            update=self.update,
            apply=self.apply,
            busy_version=lambda: self._busy_version,
            on_error=self._failed,
        )
        #: periodic checks, switched and timed at run time (periodic.py).
        self.periodic = PeriodicChecks(
            enabled=config.auto_check,
            interval=config.check_interval,
            update=self.update,
            busy=self.store.op_lock.locked,
        )
        #: the trial of a new version; the agent runs its child's trial with it too.
        self.trial = TrialWatch(self.ctx, supervised=self.host.supervises)
        #: the owner lock (owner.py): taken by run(), or before it by the agent.
        self.owner: OwnerLock | None = None
        #: the agent's app, served on the control socket (device_ops.py).
        self.app_control: AppControl | None = None
        #: the app's activity reports and the pending-update notice (activity.py).
        self.activity = ActivityBoard(
            busy_command=config.busy_command,
            busy_timeout=config.busy_timeout,
            cwd=config.cwd or config.app_root,
        )
        #: the first step of every apply (activity_gate.py).
        self.gate = ActivityGate.for_config(
            config,
            self.activity,
            report=DeferredReports(self._reporter, self.session),
            app_running=self._app_running,
            app_busy=None if can_update is None else self._app_busy,
            on_pending=on_update_pending,
        )

    @property
    def installed_version(self) -> str | None:
        return self.store.state.installed_version

    @property
    def auto_check(self) -> bool:
        """Periodic checks are on (see :meth:`set_auto_check`)."""
        return self.periodic.enabled

    @property
    def check_interval(self) -> float:
        """Seconds between periodic checks (see :meth:`set_check_interval`)."""
        return self.periodic.interval

    @property
    def phase(self) -> str:
        """The last progress state reported."""
        return self._reporter.phase

    def _failed(self, error: str) -> None:
        self.last_error = error

    def _hello(self) -> Hello:
        s = self.store.state
        return Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=self.config.device_id,
            public_key=self.session.public_key,
            app=self.config.app,
            version=s.installed_version,
            channel=self.config.channel,
            sequence=s.installed_sequence,
            group=self.config.group,
            # the releaser offers a blake3 release only to devices announcing it
            # (§7.2), content-defined chunks and DATA_ZSTD likewise (§7.3.3, §2.3.1)
            capabilities=download_capabilities(),
        )

    async def _on_connected(self, _peer: object) -> None:
        await freshness.accept_hello(self.ctx)  # §8.6: the hello's statement, if any
        self._reporter.wake.set()
        self.periodic.check_soon()
        self.pushes.maybe_resume()

    # --- checking and staging (update_check.py, update_stage.py) ---------------------------

    async def check(self, *, timeout: float | None = None) -> UpdateInfo:
        """Ask the releaser what is newest for this device; verify it; download nothing.

        Raises :class:`Unreachable` (within ``timeout``, default
        ``check_timeout``), :class:`RpcError`, or a :class:`TrustError` if the
        offered manifest is refused (reported as failed too).
        """
        info = await update_check.check(
            self.ctx,
            timeout=self.config.check_timeout if timeout is None else timeout,
            on_update_available=self.on_update_available,
        )
        self.last_info = info
        return info

    async def stage(
        self,
        verified: VerifiedManifest,
        *,
        push_id: str = "",
        forced: bool = False,
        restart: bool | None = None,
    ) -> StagedInfo:
        """Download and verify ``verified`` into updates/<version>, mark it STAGED.

        Raises :class:`Unreachable`, DownloadError, IntegrityError,
        DiskFullError... (each also reported as ``failed``).
        """
        return await self._stage(verified, push_id=push_id, forced=forced, restart=restart)

    async def _stage(
        self,
        verified: VerifiedManifest,
        *,
        push_id: str = "",
        forced: bool = False,
        restart: bool | None = None,
        retry: bool = False,
    ) -> StagedInfo:
        try:
            result = await update_stage.stage(
                self.ctx, verified, push_id=push_id, forced=forced, restart=restart, retry=retry
            )
        except FleetpushError as e:
            self.last_error = str(e)
            raise
        if result.download is not None:
            self.last_download = result.download
        return result.staged

    # --- applying -------------------------------------------------------------------------

    def _app_running(self) -> bool:
        """Someone may be using the app: the agent's child while it starts or
        runs (not before its first start, nor while it is down); without an
        agent, assume so."""
        if self.app_control is None:
            return True
        return self.app_control.describe().get("app_state") in ("starting", "running")

    def _app_busy(self) -> bool:
        """An embedded app's ``can_update()`` says no (raises what it raises)."""
        return self.can_update is not None and not self.can_update()

    async def wait_allowed(
        self, version: str, *, forced: bool, push_id: str = ""
    ) -> Verdict | None:
        """The activity gate (activity_gate.py): wait while the app's users,
        ``can_update()`` or the maintenance window say so; a forced update goes
        ahead anyway after ``force_deadline``."""

        def wanted() -> bool:
            return still_staged(self.store.state, version)

        return await self.gate.wait(version, forced=forced, push_id=push_id, wanted=wanted)

    async def apply(self, version: str, *, push_id: str = "", forced: bool | None = None) -> None:
        """Apply staged ``version`` through the host (embedded: never returns).

        Raises what the host raises (UpdaterError, reported as failed).
        """
        s = self.store.reload()
        staged = s.staged if s.staged and s.staged.version == version else None
        if forced is None:
            forced = bool(staged and staged.forced)
        if await self.wait_allowed(version, forced=forced, push_id=push_id) is None:
            return  # superseded at the gate: the newer push applies its own version
        await self._reporter.progress("applying", version, push_id=push_id)
        try:
            await self.host.apply(self.ctx, version)
        finally:
            self.activity.post_notice(None)  # applied or failed: nothing pending

    async def update(
        self,
        version: str | None = None,
        *,
        push_id: str = "",
        forced: bool = False,
        restart: bool | None = None,
        timeout: float | None = None,
    ) -> UpdateInfo:
        """Check (or fetch ``version``'s manifest), stage it, and apply it if
        ``restart`` (default: the manifest's) says so.

        Raises :class:`UpdateRefused` if nothing applicable is offered, and
        what :meth:`check`/:meth:`stage` raise.
        """
        timeout = self.config.check_timeout if timeout is None else timeout
        progress = self._reporter.progress
        async with self.store.op_lock:
            # 1. What to install: the releaser's offer, or the pushed version.
            if version is None:
                info = await self.check(timeout=timeout)
                if not info.available or info.verified is None:
                    raise UpdateRefused(info.reason or "no update available")
                verified = info.verified
            else:
                if forced:  # persisted first: a kill or a lost link does not lose it
                    await self.pushes.remember(version, push_id, restart, forced)
                await progress("checking", version, push_id=push_id)
                try:
                    verified = await update_check.manifest_for(self.ctx, version, timeout)
                except (TrustError, Unreachable, RpcError) as e:
                    await progress("failed", version, push_id=push_id, error=str(e))
                    if isinstance(e, TrustError):
                        await self._reporter.record(
                            "failed", version, f"manifest refused: {e}", push_id
                        )
                    if not isinstance(e, Unreachable):  # kept: resumed once connected
                        await self.pushes.forget(version)
                    raise
                info = update_check.judge(
                    self.store.state,
                    UpdateInfo(installed=self.store.state.installed_version, offered=version),
                    verified,
                )
                if info.reason == "installed":
                    await self.pushes.forget(version)
                    await progress("committed", version, push_id=push_id)
                    return info
                if not info.available and not forced:
                    raise UpdateRefused(f"{version}: {info.reason}")
            # 2. Download and stage it (a push retries resumable failures).
            self._busy_version = verified.manifest.version
            try:
                if forced and version is not None:
                    staged = await self.pushes.stage_retrying(
                        verified, push_id=push_id, restart=restart
                    )
                else:
                    staged = await self._stage(
                        verified, push_id=push_id, forced=forced, restart=restart
                    )
            finally:
                self._busy_version = None
        # 3. Apply, outside the lock: a deferred apply (busy app) must not block a push.
        if staged.restart:
            await self.apply(staged.version, push_id=push_id, forced=forced)
        return info

    # --- releaser commands (decided in commands.py) -----------------------------------------

    async def _on_command(self, method: str, cmd: UpdateCommand) -> Ack:
        """The session's command callback (command_runner.py): persist, answer, work."""
        return await self.commands.on_command(method, cmd)

    async def _run_command(self, method: str, cmd: UpdateCommand) -> None:
        """Carry out an accepted command; failures are logged and kept in ``last_error``."""
        await self.commands.run(method, cmd)

    # --- trial (trial_watch.py) ---------------------------------------------------------------

    def confirm(self) -> None:
        """The app is healthy: commit the version on trial. Thread-safe; idempotent."""
        self.trial.confirm()

    # --- running -----------------------------------------------------------------------------

    def set_auto_check(self, enabled: bool, interval: float | None = None) -> None:
        """Switch periodic checks on or off, or change their interval, at run time.

        Raises ValueError if ``interval`` is not positive.
        """
        self.periodic.configure(enabled, interval)

    def enable_auto_update(self) -> None:
        """Periodic checks on: each installs what it finds (``auto_check = true``)."""
        self.set_auto_check(True)

    def disable_auto_update(self) -> None:
        """Periodic checks off; pushes from the releaser still work."""
        self.set_auto_check(False)

    def set_check_interval(self, seconds: float) -> None:
        """Check every ``seconds`` from now on, on or off as before.

        Raises ValueError if ``seconds`` is not positive.
        """
        if seconds <= 0:
            raise ValueError("interval must be positive")
        self.set_auto_check(self.auto_check, seconds)

    async def startup(self) -> None:
        """Recover, then settle the trial and any staged update (startup.py).

        Raises FleetpushError from recovery or a rollback (logged by run()).
        """
        await settle_at_start(self.ctx, self.host, self.trial, self.apply)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the updater until cancelled. Starts at once; never raises for network trouble."""
        self._reporter.trio_token = trio.lowlevel.current_trio_token()
        # One owner of the device (issue 11): raises OwnerBusy before anything runs.
        own = self.owner is None
        if self.owner is None:
            self.owner = OwnerLock.acquire(self.ctx.layout, "updater")
        try:
            async with trio.open_nursery() as nursery:
                self._spawner.attach(nursery)
                ops = await nursery.start(serve_control, self, self.app_control, self.activity)
                if self.config.health_listen:  # off by default
                    failed = await start_health(nursery, self.config.health_listen, ops.status_doc)
                    self.last_error = failed or self.last_error
                if self.ctx.p2p is not None:  # off by default: no port at all
                    await self.ctx.p2p.start(nursery, activity_busy(self.activity))
                await nursery.start(self.session.run)
                nursery.start_soon(self._reporter.flusher)
                try:
                    await self.startup()
                except FleetpushError as e:
                    log.error("startup: %s", e)
                    self.last_error = str(e)
                if self.trial.deadline(self.store.state) is not None and not self.host.supervises:
                    nursery.start_soon(watch_trial, self.ctx, self.host, self.trial)
                nursery.start_soon(self.periodic.run)
                nursery.start_soon(freshness.watch, self.ctx)
                # A push interrupted by a kill: resumed now if connected, else on connect.
                self.pushes.resume_enabled = True
                if self.session.connected:
                    self.pushes.maybe_resume()
                task_status.started()
        finally:
            self._spawner.attach(None)
            if own:
                self.owner.release()
                self.owner = None

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[Updater]:
        """Only the releaser session and the history flusher, for one-shot use
        (``fleetpush update``): no startup, no periodic checks, no trial task."""
        try:
            async with trio.open_nursery() as nursery:
                self._spawner.attach(nursery)
                await nursery.start(self.session.run)
                nursery.start_soon(self._reporter.flusher)
                try:
                    yield self
                finally:
                    with trio.move_on_after(2.0):
                        if self.session.connected:
                            await self._reporter.flush_history()
                    nursery.cancel_scope.cancel()
        finally:
            self._spawner.attach(None)

    def status(self) -> dict[str, Any]:
        s = self.store.state
        info = self.last_info
        return {
            "app": self.config.app,
            "device_id": self.config.device_id,
            "installed": s.installed_version,
            "sequence": s.installed_sequence,
            "newest": info.offered if info else None,
            "update_available": bool(info and info.available),
            "checked": info is not None,
            "phase": self.phase,
            "connection": self.session.state,
            # which releaser answers, when several are configured (issue 15)
            "connected_to": self.session.releaser,
            "trial": s.trial.version if s.trial else None,
            "staged": s.staged.version if s.staged else None,
            "bad_releases": list(s.bad_releases),
            "last_error": self.last_error,
            # LAN peer delivery (§7.11): what this device uploaded; None when off.
            "p2p": self.ctx.p2p.status() if self.ctx.p2p is not None else None,
        }

    # --- for apps that are not trio -----------------------------------------------------------

    def start_in_thread(self) -> ThreadHandle:
        """Run the updater in a daemon thread with its own trio loop."""
        return ThreadHandle(self)


__all__ = [
    "PENDING_PUSH",
    "PROGRESS_INTERVAL",
    "Host",
    "ReexecHost",
    "ThreadHandle",
    "UpdateInfo",
    "UpdateRefused",
    "Updater",
    "in_window",
    "pending_push",
]
