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
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, Protocol

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError, RpcError, TrustError
from fleetpush.protocol.frames import PROTOCOL_VERSION
from fleetpush.protocol.messages import (
    Ack,
    CheckUpdate,
    CheckUpdateResult,
    GetManifest,
    GetManifestResult,
    Hello,
    SignedManifest,
    UpdateCommand,
    UpdateProgress,
)
from fleetpush.protocol.trust import VerifiedManifest, verify_manifest

from . import install, trial
from .config import UpdaterConfig, parse_window
from .download import DownloadError, DownloadResult, download
from .errors import DiskFullError, UpdaterError
from .layout import StateLayout
from .session import Session, Unreachable, backoff_delay, load_or_create_device_key
from .staging import load_staged_manifest, mark_staged
from .state import DeviceState, StagedInfo, load_state, save_state

log = logging.getLogger("fleetpush.client.updater")

#: Progress notifications while downloading are sent at most this often.
PROGRESS_INTERVAL: Final = 0.25
#: How often a deferred update asks can_update() again.
DEFER_POLL: Final = 1.0

#: ``DeviceState.extra`` key of a forced (pushed) update not staged yet:
#: ``{"version", "push_id", "restart", "forced", "attempts"}``. It survives a
#: kill so the download is resumed after a restart, once connected.
PENDING_PUSH: Final = "pending_push"

#: Download failures worth another attempt of a forced update (the downloader
#: resumes: staged chunks are re-verified, only missing ones fetched). Not
#: IntegrityError/TrustError (a bad release) nor DiskFullError (needs a human).
_RESUMABLE: Final = (DownloadError, Unreachable)

#: history event -> update_progress state (events of state.py plus ours).
_EVENT_STATES: Final = {
    "staged": "staged",
    "applied": "trial",
    "committed": "committed",
    "rolled-back": "rolled_back",
    "failed": "failed",
    "apply-failed": "failed",
    "apply-interrupted": "failed",
    "rollback-failed": "failed",
}


class UpdateRefused(UpdaterError):
    """The update was not done: nothing offered, a bad release, or the releaser refused."""


def pending_push(s: DeviceState) -> dict[str, Any] | None:
    """The persisted forced update still to be downloaded, if any."""
    p = s.extra.get(PENDING_PUSH)
    if isinstance(p, dict) and isinstance(p.get("version"), str):
        return p
    return None


def _with_pending(s: DeviceState, pending: dict[str, Any] | None) -> DeviceState:
    extra = {k: v for k, v in s.extra.items() if k != PENDING_PUSH}
    if pending is not None:
        extra[PENDING_PUSH] = pending
    return attrs.evolve(s, extra=extra)


def _without_pending(s: DeviceState, version: str) -> DeviceState:
    p = pending_push(s)
    return _with_pending(s, None) if p is not None and p["version"] == version else s


@attrs.frozen(kw_only=True)
class UpdateInfo:
    """What :meth:`Updater.check` found."""

    installed: str | None
    offered: str | None = None
    sequence: int | None = None
    status: str | None = None
    available: bool = False
    #: why an offered version is not available (bad release, already staged...).
    reason: str = ""
    verified: VerifiedManifest | None = attrs.field(default=None, eq=False, repr=False)


class Host(Protocol):
    """How updates reach the running app: embedded re-exec, or the agent's child."""

    async def apply(self, updater: Updater, version: str) -> None:
        """Install staged ``version`` and run it (may never return: execv)."""

    async def restart_after_rollback(self, updater: Updater) -> None:
        """The installed files were rolled back: run the restored version."""


def _saved_argv() -> tuple[str, list[str]]:
    """The executable and argv that re-create this process (interpreter flags kept)."""
    return sys.executable, [sys.executable, *sys.orig_argv[1:]]


class ReexecHost:
    """Embedded mode: re-exec into apply mode, which execs this same command line after."""

    def __init__(self, argv: list[str] | None = None, executable: str | None = None) -> None:
        exe, default = _saved_argv()
        self.executable = executable or exe
        self.argv = argv or default

    async def apply(self, updater: Updater, version: str) -> None:
        # Imported here: `python -m fleetpush.client.applymode` imports this
        # package first, and must not find itself already imported.
        from .applymode import reexec_into_apply_mode, write_saved_args

        cfg = updater.config
        await trio.to_thread.run_sync(
            lambda: write_saved_args(
                cfg.state_dir, version, self.argv, self.executable, os.getcwd()
            )
        )
        await updater.progress("restarting", version)
        log.info("re-executing into apply mode for %s", version)
        reexec_into_apply_mode(cfg.state_dir, cfg.app_root, version)

    async def restart_after_rollback(self, updater: Updater) -> None:
        log.warning("rolled back: restarting into the restored version")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(self.executable, self.argv)  # noqa: S606 - our own command line


def in_window(window: str | None, now: datetime) -> bool:
    """True if ``now`` (local time) is inside the daily ``HH:MM-HH:MM`` window."""
    if window is None:
        return True
    start, end = parse_window(window)
    minute = now.hour * 60 + now.minute
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps midnight


class Updater:
    """The device side of fleetpush (see the module docstring)."""

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        on_update_available: Callable[[UpdateInfo], object] | None = None,
        on_progress: Callable[[UpdateProgress], object] | None = None,
        can_update: Callable[[], bool] | None = None,
        host: Host | None = None,
        tls: object | None = None,
    ) -> None:
        self.config = config
        self.layout = StateLayout.of(config.state_dir)
        self.trust = config.trust_root()
        self.on_update_available = on_update_available
        self.on_progress = on_progress
        self.can_update = can_update
        self.host: Host = host or ReexecHost()
        self.auto_check = config.auto_check
        self.check_interval = config.check_interval
        self.key = load_or_create_device_key(config.state_dir)
        self.session = Session(
            config,
            self.key,
            hello=self._hello,
            on_command=self._on_command,
            on_connected=self._on_connected,
            tls=tls,
        )
        self.state = self._initial_state()
        #: last progress state reported, and the outcome of the last operations.
        self.phase = "idle"
        self.last_info: UpdateInfo | None = None
        self.last_download: DownloadResult | None = None
        self.last_error: str | None = None
        self._op_lock = trio.Lock()
        self._busy_version: str | None = None
        self._nursery: trio.Nursery | None = None
        self._wake_periodic = trio.Event()
        self._wake_flush = trio.Event()
        self._confirmed = threading.Event()
        self._trial_started: float | None = None
        self._last_progress_sent = 0.0
        self._trio_token: trio.lowlevel.TrioToken | None = None
        #: run() has started up: pending pushes may be resumed on connect.
        self._resume_enabled = False
        self._resuming = False
        self._rng = random.Random()

    # --- state ------------------------------------------------------------------------

    def _initial_state(self) -> DeviceState:
        state = load_state(self.config.state_dir)
        changed = False
        if not state.app:
            state, changed = attrs.evolve(state, app=self.config.app), True
        if state.installed_version is None and self.config.version is not None:
            state, changed = attrs.evolve(state, installed_version=self.config.version), True
        if changed:
            save_state(self.config.state_dir, state)
        return state

    def reload_state(self) -> DeviceState:
        self.state = load_state(self.config.state_dir)
        return self.state

    async def _change_state(self, change: Callable[[DeviceState], DeviceState]) -> DeviceState:
        def work() -> DeviceState:
            state = change(load_state(self.config.state_dir))
            save_state(self.config.state_dir, state)
            return state

        self.state = await trio.to_thread.run_sync(work)
        return self.state

    async def record(
        self, event: str, version: str | None, error: str | None = None, push_id: str = ""
    ) -> None:
        """Persist an outcome in the history and get it to the releaser (now or later)."""
        now = time.time()

        def change(s: DeviceState) -> DeviceState:
            s = s.record(now, event, version, error)
            if push_id:
                entry = {**s.history[-1], "push_id": push_id}
                s = attrs.evolve(s, history=(*s.history[:-1], entry), last_result=entry)
            return s

        try:
            await self._change_state(change)
        except DiskFullError as e:
            # Reporting an outcome must not replace the error being reported
            # (typically the disk-full download itself); the live
            # update_progress already told the releaser, only the durable copy
            # for a later re-send is lost.
            log.warning("could not persist %s %s in the history: %s", event, version or "", e)
            return
        self._wake_flush.set()

    @property
    def installed_version(self) -> str | None:
        return self.state.installed_version

    def _hello(self) -> Hello:
        s = self.state
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
        )

    # --- progress ------------------------------------------------------------------------

    async def progress(
        self,
        state: str,
        version: str = "",
        *,
        push_id: str = "",
        done: int = 0,
        total: int = 0,
        error: str | None = None,
    ) -> None:
        """Report a step: the on_progress hook, the log, and ``update_progress``."""
        msg = UpdateProgress(
            state=state,
            app=self.config.app,
            version=version,
            push_id=push_id,
            bytes_done=done,
            bytes_total=total,
            error=error,
        )
        if state != self.phase or state != "downloading":
            log.info(
                "update %s%s%s",
                state,
                f" {version}" if version else "",
                f": {error}" if error else "",
            )
        self.phase = state
        if self.on_progress is not None:
            try:
                self.on_progress(msg)
            except Exception:
                log.exception("on_progress hook failed")
        await self.session.notify("update_progress", msg)

    async def _flush_history(self) -> None:
        """Send every persisted outcome the releaser has not acknowledged yet."""
        state = await trio.to_thread.run_sync(load_state, self.config.state_dir)
        sent: list[dict[str, Any]] = []
        for entry in state.history:
            pstate = _EVENT_STATES.get(str(entry.get("state")))
            if pstate is None:
                sent.append(entry)
                continue
            msg = UpdateProgress(
                state=pstate,
                app=self.config.app,
                version=str(entry.get("version") or ""),
                push_id=str(entry.get("push_id") or ""),
                error=entry.get("error"),
            )
            if not await self.session.notify("update_progress", msg):
                break
            sent.append(entry)
        if sent:
            await self._change_state(
                lambda s: attrs.evolve(s, history=tuple(h for h in s.history if h not in sent))
            )

    async def _flusher(self) -> None:
        while True:
            await self._wake_flush.wait()
            self._wake_flush = trio.Event()
            if self.session.connected:
                try:
                    await self._flush_history()
                except FleetpushError as e:
                    log.info("history flush: %s", e)

    async def _on_connected(self, _peer: object) -> None:
        self._wake_flush.set()
        if self.auto_check:
            self._wake_periodic.set()
        self._maybe_resume_push()

    # --- checking -------------------------------------------------------------------------

    def _verify(self, signed: SignedManifest) -> VerifiedManifest:
        s = self.state
        return verify_manifest(
            self.trust,
            signed,
            app=self.config.app,
            high_water=s.high_water,
            now=time.time(),
            installed_version=s.installed_version,
        )

    async def _trust(self, signed: SignedManifest) -> VerifiedManifest:
        """Trust rules, then persist the raised high-water mark before anything else."""
        self.reload_state()
        verified = self._verify(signed)
        if verified.advances:
            seq = verified.manifest.sequence
            await self._change_state(lambda s: s.raise_high_water(seq))
        return verified

    async def check(self, *, timeout: float | None = None) -> UpdateInfo:
        """Ask the releaser what is newest for this device; verify it; download nothing.

        Raises :class:`Unreachable` (within ``timeout``, default
        ``check_timeout``), :class:`RpcError`, or a :class:`TrustError` if the
        offered manifest is refused (reported as failed too).
        """
        timeout = self.config.check_timeout if timeout is None else timeout
        await self.progress("checking")
        s = self.reload_state()
        params = CheckUpdate(
            app=self.config.app,
            version=s.installed_version or "0",
            channel=self.config.channel,
            sequence=s.installed_sequence,
        )
        try:
            result = await self.session.request("check_update", params, timeout)
        except (Unreachable, RpcError) as e:
            await self.progress("failed", error=f"check: {e}")
            raise
        assert isinstance(result, CheckUpdateResult)
        info = UpdateInfo(
            installed=s.installed_version,
            offered=result.version,
            sequence=result.sequence,
            status=result.status,
        )
        if result.available and result.manifest is not None:
            try:
                verified = await self._trust(result.manifest)
            except TrustError as e:
                await self.progress("failed", result.version or "", error=f"refused: {e}")
                await self.record("failed", result.version, f"manifest refused: {e}")
                raise
            info = self._judge(attrs.evolve(info, offered=verified.manifest.version), verified)
        else:
            info = attrs.evolve(info, reason="up to date")
        self.last_info = info
        await self.progress("idle" if info.available else "up_to_date", info.offered or "")
        if info.available and self.on_update_available is not None:
            try:
                self.on_update_available(info)
            except Exception:
                log.exception("on_update_available hook failed")
        return info

    def _judge(self, info: UpdateInfo, verified: VerifiedManifest) -> UpdateInfo:
        m, s = verified.manifest, self.state
        if m.version == s.installed_version and m.sequence == s.installed_sequence:
            return attrs.evolve(info, reason="installed", verified=verified)
        if s.is_bad(m.version):
            return attrs.evolve(
                info, reason="failed on this device before (push it to retry)", verified=verified
            )
        if not verified.advances and m.sequence <= s.installed_sequence:
            return attrs.evolve(
                info, reason="not newer than the installed release", verified=verified
            )
        return attrs.evolve(info, available=True, verified=verified)

    async def _manifest_for(self, version: str, timeout: float) -> VerifiedManifest:
        result = await self.session.request(
            "get_manifest", GetManifest(app=self.config.app, version=version), timeout
        )
        assert isinstance(result, GetManifestResult)
        return await self._trust(result.manifest)

    # --- downloading ----------------------------------------------------------------------

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
        """:meth:`stage`; with ``retry`` a resumable failure is raised unreported."""
        m = verified.manifest
        restart = m.restart if restart is None else restart
        s = self.reload_state()
        if s.staged is not None and s.staged.version == m.version:
            try:
                await trio.to_thread.run_sync(
                    load_staged_manifest, self.config.state_dir, m.version
                )
            except UpdaterError:
                pass
            else:
                info = attrs.evolve(
                    s.staged,
                    push_id=push_id or s.staged.push_id,
                    forced=forced or s.staged.forced,
                    restart=restart,
                )
                await self._change_state(
                    lambda st: _without_pending(attrs.evolve(st, staged=info), m.version)
                )
                return info
        last = 0.0

        def on_progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done >= total or now - last >= PROGRESS_INTERVAL:
                last = now
                if self._nursery is not None:
                    self._nursery.start_soon(
                        lambda: self.progress(
                            "downloading", m.version, push_id=push_id, done=done, total=total
                        )
                    )

        await self.progress("downloading", m.version, push_id=push_id, total=m.total_size)
        try:
            peer = await self.session.wait_connected(self.config.check_timeout)
            result = await download(
                peer,
                verified.signed,
                m,
                self.layout,
                self.config.app_root,
                window=self.config.window,
                chunks_per_request=self.config.chunks_per_request,
                io_threads=self.config.io_threads,
                max_rate=self.config.max_download_rate,
                on_progress=on_progress,
            )
            self.last_download = result
            log.info(
                "downloaded %s: %d chunks fetched, %d resumed, %d copied locally, %.2fs",
                m.version,
                result.chunks_fetched,
                result.chunks_resumed,
                result.chunks_copied,
                result.elapsed,
            )
            await self.progress("verifying", m.version, push_id=push_id)
            await trio.to_thread.run_sync(
                lambda: mark_staged(self.config.state_dir, m.version, verify=False)
            )
        except FleetpushError as e:
            self.last_error = str(e)
            if not (retry and isinstance(e, _RESUMABLE)):
                await self.progress("failed", m.version, push_id=push_id, error=str(e))
                await self.record("failed", m.version, f"download: {e}", push_id)
            raise
        previous = s.staged.attempts if s.staged and s.staged.version == m.version else 0
        info = StagedInfo(
            version=m.version,
            sequence=m.sequence,
            restart=restart,
            push_id=push_id or None,
            forced=forced,
            attempts=previous,
        )
        # Staged and no longer pending in one atomic write.
        await self._change_state(
            lambda st: _without_pending(attrs.evolve(st, staged=info), m.version)
        )
        await self.progress("staged", m.version, push_id=push_id)
        await self.record("staged", m.version, None, push_id)
        return info

    async def _remember_push(
        self, version: str, push_id: str, restart: bool | None, forced: bool
    ) -> None:
        """Persist a forced update before anything else; a resumed one keeps its attempts."""

        def change(s: DeviceState) -> DeviceState:
            old = pending_push(s)
            same = old is not None and (old["version"], old.get("push_id")) == (version, push_id)
            attempts = int(old.get("attempts", 0)) if same and old is not None else 0
            pending = {
                "version": version,
                "push_id": push_id,
                "restart": restart,
                "forced": forced,
                "attempts": attempts,
            }
            return _with_pending(s, pending)

        await self._change_state(change)

    async def _forget_push(self, version: str) -> None:
        if pending_push(self.reload_state()) is not None:
            await self._change_state(lambda s: _without_pending(s, version))

    async def _count_attempt(self, version: str) -> int:
        """Persist one more download attempt (before it starts: a kill counts too)."""

        def change(s: DeviceState) -> DeviceState:
            p = pending_push(s)
            if p is None or p["version"] != version:
                return s
            return _with_pending(s, {**p, "attempts": int(p.get("attempts", 0)) + 1})

        p = pending_push(await self._change_state(change))
        return int(p["attempts"]) if p is not None and p["version"] == version else 1

    async def _stage_retrying(
        self, verified: VerifiedManifest, *, push_id: str, restart: bool | None
    ) -> StagedInfo:
        """Stage a forced update, retrying resumable failures with backoff up to
        ``max_download_attempts`` (counted across restarts). The last failure
        is reported as ``failed``; raises what :meth:`stage` raises.
        """
        m = verified.manifest
        limit = self.config.max_download_attempts
        while True:
            attempt = await self._count_attempt(m.version)
            try:
                return await self._stage(
                    verified, push_id=push_id, forced=True, restart=restart, retry=attempt < limit
                )
            except _RESUMABLE as e:
                if attempt >= limit:
                    await self._forget_push(m.version)
                    raise
                delay = backoff_delay(
                    attempt, self.config.backoff_initial, self.config.backoff_max, self._rng
                )
                log.warning(
                    "download of %s, attempt %d/%d: %s; retrying in %.1fs",
                    m.version,
                    attempt,
                    limit,
                    e,
                    delay,
                )
                await self.progress(
                    "downloading",
                    m.version,
                    push_id=push_id,
                    error=f"attempt {attempt}/{limit}: {e}; retrying in {delay:.1f}s",
                )
                await trio.sleep(delay)
            except FleetpushError:
                await self._forget_push(m.version)  # a bad release or a full disk: stop
                raise

    def _maybe_resume_push(self) -> None:
        if not self._resume_enabled or self._resuming or self._nursery is None:
            return
        if pending_push(self.reload_state()) is not None:
            self._resuming = True
            self._nursery.start_soon(self._resume_push)

    async def _resume_push(self) -> None:
        """Continue a persisted forced update (after a restart or a lost connection)."""
        try:
            while self._op_lock.locked():  # e.g. the retry loop of the same push
                await trio.sleep(0.2)
            p = pending_push(self.reload_state())
            if p is None:
                return
            version, push_id = p["version"], str(p.get("push_id") or "")
            if int(p.get("attempts", 0)) >= self.config.max_download_attempts:
                error = f"gave up after {p.get('attempts')} download attempts"
                await self._forget_push(version)
                await self.progress("failed", version, push_id=push_id, error=error)
                await self.record("failed", version, f"download: {error}", push_id)
                return
            log.info("resuming the pushed update to %s", version)
            restart = p.get("restart")
            await self.update(
                version,
                push_id=push_id,
                forced=True,
                restart=restart if isinstance(restart, bool) else None,
                timeout=max(self.config.check_timeout, 10.0),
            )
        except FleetpushError as e:
            log.warning("resuming the pushed update: %s", e)
            self.last_error = str(e)
        finally:
            self._resuming = False

    # --- applying -------------------------------------------------------------------------

    def _allowed(self, forced: bool) -> bool:
        if self.can_update is not None:
            try:
                if not self.can_update():
                    return False
            except Exception:
                log.exception("can_update hook failed; treating as busy")
                return False
        return forced or in_window(self.config.maintenance_window, datetime.now())

    async def wait_allowed(self, version: str, *, forced: bool, push_id: str = "") -> None:
        """Defer while the app is busy (or outside the window); a forced update
        goes ahead anyway after ``force_deadline``."""
        if self._allowed(forced):
            return
        await self.progress("deferred", version, push_id=push_id)
        deadline = trio.current_time() + self.config.force_deadline if forced else None
        while not self._allowed(forced):
            if deadline is not None and trio.current_time() >= deadline:
                log.warning("forced update %s: busy past the deadline, applying anyway", version)
                return
            await trio.sleep(DEFER_POLL)

    async def apply(self, version: str, *, push_id: str = "", forced: bool | None = None) -> None:
        """Apply staged ``version`` through the host (embedded: never returns)."""
        s = self.reload_state()
        staged = s.staged if s.staged and s.staged.version == version else None
        if forced is None:
            forced = bool(staged and staged.forced)
        await self.wait_allowed(version, forced=forced, push_id=push_id)
        await self.progress("applying", version, push_id=push_id)
        await self.host.apply(self, version)

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
        async with self._op_lock:
            if version is None:
                info = await self.check(timeout=timeout)
                if not info.available or info.verified is None:
                    raise UpdateRefused(info.reason or "no update available")
                verified = info.verified
            else:
                if forced:
                    await self._remember_push(version, push_id, restart, forced)
                await self.progress("checking", version, push_id=push_id)
                try:
                    verified = await self._manifest_for(version, timeout)
                except (TrustError, Unreachable, RpcError) as e:
                    await self.progress("failed", version, push_id=push_id, error=str(e))
                    if isinstance(e, TrustError):
                        await self.record("failed", version, f"manifest refused: {e}", push_id)
                    if not isinstance(e, Unreachable):  # kept: resumed once connected
                        await self._forget_push(version)
                    raise
                info = self._judge(
                    UpdateInfo(installed=self.state.installed_version, offered=version),
                    verified,
                )
                if info.reason == "installed":
                    await self._forget_push(version)
                    await self.progress("committed", version, push_id=push_id)
                    return info
                if not info.available and not forced:
                    raise UpdateRefused(f"{version}: {info.reason}")
            self._busy_version = verified.manifest.version
            try:
                if forced and version is not None:
                    staged = await self._stage_retrying(verified, push_id=push_id, restart=restart)
                else:
                    staged = await self._stage(
                        verified, push_id=push_id, forced=forced, restart=restart
                    )
            finally:
                self._busy_version = None
        # Outside the lock: a deferred apply (busy app) must not block a push.
        if staged.restart:
            await self.apply(staged.version, push_id=push_id, forced=forced)
        return info

    # --- releaser commands ----------------------------------------------------------------

    async def _on_command(self, method: str, cmd: UpdateCommand) -> Ack:
        if cmd.app != self.config.app:
            return Ack(accepted=False, reason=f"this device runs {self.config.app!r}")
        if self._nursery is None:
            return Ack(accepted=False, reason="updater not running")
        if self._busy_version == cmd.version:
            return Ack(accepted=True, reason="already in progress")
        self._nursery.start_soon(self._run_command, method, cmd)
        return Ack(accepted=True)

    async def _run_command(self, method: str, cmd: UpdateCommand) -> None:
        try:
            if method == "__apply_update__":
                s = self.reload_state()
                if s.staged is not None and s.staged.version == cmd.version:
                    await self.apply(cmd.version, push_id=cmd.push_id, forced=True)
                    return
            # __force_update__ (restart=False is "stage": download only), or an
            # apply of something not staged yet: download first.
            # An operator push clears the bad mark: the engine re-tries it once.
            restart = True if method == "__apply_update__" else cmd.restart
            await self.update(
                cmd.version,
                push_id=cmd.push_id,
                forced=True,
                restart=restart,
                timeout=max(self.config.check_timeout, 10.0),
            )
        except FleetpushError as e:
            log.warning("%s %s failed: %s", method, cmd.version, e)
            self.last_error = str(e)

    # --- trial ------------------------------------------------------------------------------

    def confirm(self) -> None:
        """The app is healthy: commit the version on trial. Thread-safe; idempotent."""
        self._confirmed.set()
        self._commit_sync()

    def _commit_sync(self) -> bool:
        s = load_state(self.config.state_dir)
        if s.trial is None or s.trial.version != s.installed_version:
            return False
        self.state = trial.confirm(self.config.state_dir, time.time(), s.installed_version)
        log.info("%s committed", s.installed_version)
        self._poke_flusher()
        return True

    def _poke_flusher(self) -> None:
        """Wake the history flusher from the trio thread or from any other thread."""
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = self._trio_token
            if token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._wake_flush.set, trio_token=token)
        else:
            self._wake_flush.set()

    def trial_deadline(self, s: DeviceState) -> float | None:
        """When the trial of the installed version ends (config may shorten the engine's)."""
        if s.trial is None or s.trial.version != s.installed_version:
            return None
        return min(s.trial.deadline, s.trial.started_at + self.config.trial_seconds)

    async def begin_start(self) -> str:
        """Before (re)starting the app on trial: count the start or roll back.

        Returns "no-trial", "on-trial" or "rolled-back" (the restored version
        must be started instead).
        """
        cfg = self.config
        s = self.reload_state()
        deadline = self.trial_deadline(s)
        if deadline is not None and time.time() >= deadline:
            return await self.roll_back(f"not confirmed within {cfg.trial_seconds:g}s")
        outcome = await trio.to_thread.run_sync(
            lambda: trial.begin_start(cfg.state_dir, cfg.app_root, time.time(), cfg.max_attempts)
        )
        self.reload_state()
        if outcome.rollback is not None:
            failed = outcome.rollback.failed_version
            await self._report_rollback(failed, f"{outcome.attempts} starts without a confirmation")
            return "rolled-back"
        if outcome.verdict is trial.Verdict.ON_TRIAL:
            self._trial_started = time.time()
            await self.progress("trial", self.state.installed_version or "")
            return "on-trial"
        return "no-trial"

    async def roll_back(self, reason: str) -> str:
        """Roll the version on trial back (install engine), mark it bad, report it."""
        cfg = self.config
        failed = self.reload_state().installed_version
        try:
            result = await trio.to_thread.run_sync(
                lambda: install.rollback(cfg.state_dir, cfg.app_root, reason)
            )
        except UpdaterError as e:
            await self.progress("failed", failed or "", error=f"rollback failed: {e}")
            await self.record("rollback-failed", failed, str(e))
            raise
        self.reload_state()
        await self._report_rollback(result.failed_version, reason)
        return "rolled-back"

    async def _report_rollback(self, failed: str, reason: str) -> None:
        push_id = ""
        await self.progress(
            "rolled_back", self.state.installed_version or "", error=f"{failed}: {reason}"
        )
        await self.record("failed", failed, f"rolled back: {reason}", push_id)

    async def _health_ok(self) -> bool:
        cmd = self.config.health_command
        if not cmd:
            return False
        try:
            with trio.move_on_after(max(self.config.health_interval, 1.0) * 5):
                proc = await trio.run_process(
                    list(cmd),
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=str(self.config.cwd or self.config.app_root),
                )
                return proc.returncode == 0
        except OSError as e:
            log.warning("health command failed to run: %s", e)
        return False

    async def watch_trial(self, *, alive: Callable[[], bool] | None = None) -> str:
        """Run the trial of the installed version to its end.

        Commits on :meth:`confirm`, a passing health command, or surviving
        ``confirm_after``; rolls back at the trial deadline. ``alive`` (the
        agent's child) returning False means a crash: roll back at once.
        Returns "committed", "rolled-back" or "no-trial".
        """
        cfg = self.config
        started = self._trial_started or time.time()
        while True:
            s = self.reload_state()
            deadline = self.trial_deadline(s)
            if deadline is None:
                return "committed" if self._confirmed.is_set() else "no-trial"
            now = time.time()
            if self._confirmed.is_set() and await trio.to_thread.run_sync(self._commit_sync):
                return "committed"
            if alive is not None and not alive():
                return await self.roll_back("the new version exited during its trial")
            if cfg.confirm_after is not None and now - started >= cfg.confirm_after:
                await trio.to_thread.run_sync(self._commit_sync)
                return "committed"
            if await self._health_ok():
                await trio.to_thread.run_sync(self._commit_sync)
                return "committed"
            if now >= deadline:
                return await self.roll_back(f"not confirmed within {cfg.trial_seconds:g}s")
            await trio.sleep(min(cfg.health_interval, max(0.05, deadline - now), 0.5))

    # --- running -----------------------------------------------------------------------------

    def set_auto_check(self, enabled: bool, interval: float | None = None) -> None:
        """Switch periodic checks on or off, or change their interval, at run time."""
        self.auto_check = enabled
        if interval is not None:
            if interval <= 0:
                raise ValueError("interval must be positive")
            self.check_interval = interval
        self._wake_periodic.set()

    async def _periodic(self) -> None:
        while True:
            self._wake_periodic = trio.Event()
            with trio.move_on_after(self.check_interval if self.auto_check else 1e9):
                await self._wake_periodic.wait()
                if not self.auto_check:
                    continue
                await trio.sleep(0)  # coalesce wake-ups
            if not self.auto_check or self._op_lock.locked():
                continue
            try:
                await self.update()
            except UpdateRefused:
                pass
            except (FleetpushError, trio.TooSlowError) as e:
                log.info("periodic check: %s", e)

    async def startup(self) -> None:
        """Recover, then settle the trial and any staged update (embedded mode)."""
        cfg = self.config
        done = await trio.to_thread.run_sync(lambda: install.recover(cfg.state_dir, cfg.app_root))
        if done is not None:
            log.warning("recovered an interrupted %s: %s", done.op, done.action)
            if not getattr(self.host, "supervises", False):
                # Embedded: this process loaded the app's files before recovery
                # changed them; start again on what is now installed (found by
                # tests/hostile/test_hostile_kill_matrix.py, rollback steps).
                await self.host.restart_after_rollback(self)
                return
        if getattr(self.host, "supervises", False):
            # The agent counts starts and watches trials itself; a staged
            # update is applied before its first start of the app.
            s = self.reload_state()
            if s.staged is not None and not s.is_bad(s.staged.version):
                log.info("%s is staged: applying it before starting the app", s.staged.version)
                await self._apply_staged_at_start(s.staged.version)
            return
        verdict = await self.begin_start()
        if verdict == "rolled-back":
            await self.host.restart_after_rollback(self)
            return
        s = self.reload_state()
        if verdict == "no-trial" and s.staged is not None and not s.is_bad(s.staged.version):
            log.info("%s is staged: applying it now", s.staged.version)
            assert self._nursery is not None
            self._nursery.start_soon(self._apply_staged_at_start, s.staged.version)

    async def _apply_staged_at_start(self, version: str) -> None:
        try:
            await self.apply(version)
        except FleetpushError as e:
            log.warning("applying staged %s failed: %s", version, e)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the updater until cancelled. Starts at once; never raises for network trouble."""
        self._trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.session.run)
            nursery.start_soon(self._flusher)
            try:
                await self.startup()
            except FleetpushError as e:
                log.error("startup: %s", e)
                self.last_error = str(e)
            s = self.state
            if self.trial_deadline(s) is not None and not getattr(self.host, "supervises", False):
                nursery.start_soon(self._trial_task)
            nursery.start_soon(self._periodic)
            # A push interrupted by a kill: resumed now if connected, else on connect.
            self._resume_enabled = True
            if self.session.connected:
                self._maybe_resume_push()
            task_status.started()

    async def _trial_task(self) -> None:
        try:
            outcome = await self.watch_trial()
        except FleetpushError as e:
            log.error("trial: %s", e)
            return
        if outcome == "rolled-back":
            await self.host.restart_after_rollback(self)

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[Updater]:
        """Only the releaser session and the history flusher, for one-shot use
        (``fleetpush update``): no startup, no periodic checks, no trial task."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.session.run)
            nursery.start_soon(self._flusher)
            try:
                yield self
            finally:
                with trio.move_on_after(2.0):
                    if self.session.connected:
                        await self._flush_history()
                nursery.cancel_scope.cancel()

    def status(self) -> dict[str, Any]:
        s = self.state
        info = self.last_info
        return {
            "app": self.config.app,
            "device_id": self.config.device_id,
            "installed": s.installed_version,
            "sequence": s.installed_sequence,
            "newest": info.offered if info else None,
            "update_available": bool(info and info.available),
            "phase": self.phase,
            "connection": self.session.state,
            "trial": s.trial.version if s.trial else None,
            "staged": s.staged.version if s.staged else None,
            "bad_releases": list(s.bad_releases),
            "last_error": self.last_error,
        }

    # --- for apps that are not trio -----------------------------------------------------------

    def start_in_thread(self) -> ThreadHandle:
        """Run the updater in a daemon thread with its own trio loop."""
        return ThreadHandle(self)


class ThreadHandle:
    """An :class:`Updater` running in its own thread; methods are thread-safe."""

    def __init__(self, updater: Updater) -> None:
        self.updater = updater
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="fleetpush-updater", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.updater.run)
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as e:
            self.error = e
            log.exception("updater thread ended")
        finally:
            self._ready.set()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise UpdaterError("the updater thread is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def check(self) -> UpdateInfo:
        result: UpdateInfo = self._call(self.updater.check)
        return result

    def update(self) -> UpdateInfo:
        result: UpdateInfo = self._call(self.updater.update)
        return result

    def confirm(self) -> None:
        self.updater.confirm()

    def set_auto_check(self, enabled: bool, interval: float | None = None) -> None:
        if self._token is None:
            raise UpdaterError("the updater thread is not running")
        trio.from_thread.run_sync(
            self.updater.set_auto_check, enabled, interval, trio_token=self._token
        )

    def status(self) -> dict[str, Any]:
        return self.updater.status()

    def stop(self, timeout: float = 5.0) -> None:
        if self._token is not None and self._cancel is not None:
            scope = self._cancel
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        self.thread.join(timeout)


__all__ = [
    "Host",
    "ReexecHost",
    "ThreadHandle",
    "UpdateInfo",
    "UpdateRefused",
    "Updater",
    "in_window",
]
