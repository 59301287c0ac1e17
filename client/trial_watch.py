"""The trial of a newly applied version: confirm and commit it, or roll it back.

A new version is on trial until confirmed: by the app (``Updater.confirm()``),
by a passing ``health_command``, or by surviving ``confirm_after`` seconds.
Otherwise, at the trial deadline, after a crash (the agent's child exiting),
or after ``max_attempts`` starts without a confirmation, it is rolled back by
the install engine (trial.py, install.py), marked bad, and the rollback is
reported live and in the history.

:class:`TrialWatch` is a part of :class:`~fleetpush.client.updater.Updater`
(which creates one and offers its public methods); it is not used alone.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from . import install, trial
from .errors import UpdaterError
from .state import DeviceState, load_state

if TYPE_CHECKING:
    from .updater import Updater

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


class TrialWatch:
    """Confirmation, health checks and rollback for one :class:`Updater`."""

    def __init__(self, updater: Updater) -> None:
        self._updater = updater
        #: set by confirm() (from any thread); committed at the next chance.
        self.confirmed = threading.Event()
        #: when this process started the version on trial (for ``confirm_after``).
        self.started: float | None = None

    def confirm(self) -> None:
        """See :meth:`Updater.confirm`."""
        self.confirmed.set()
        self.commit_sync()

    def commit_sync(self) -> bool:
        """Commit the installed version if it is on trial; True if it was."""
        u = self._updater
        s = load_state(u.config.state_dir)
        if s.trial is None or s.trial.version != s.installed_version:
            return False
        u.state = trial.confirm(u.config.state_dir, time.time(), s.installed_version)
        log.info("%s committed", s.installed_version)
        u._reporter.poke()
        return True

    def trial_deadline(self, s: DeviceState) -> float | None:
        """See :meth:`Updater.trial_deadline`."""
        if s.trial is None or s.trial.version != s.installed_version:
            return None
        return min(s.trial.deadline, s.trial.started_at + self._updater.config.trial_seconds)

    async def begin_start(self) -> str:
        """See :meth:`Updater.begin_start`."""
        u = self._updater
        cfg = u.config
        s = u.reload_state()
        deadline = u.trial_deadline(s)
        if deadline is not None and time.time() >= deadline:
            return await u.roll_back(f"not confirmed within {cfg.trial_seconds:g}s")
        outcome = await trio.to_thread.run_sync(
            lambda: trial.begin_start(cfg.state_dir, cfg.app_root, time.time(), cfg.max_attempts)
        )
        u.reload_state()
        if outcome.rollback is not None:
            failed = outcome.rollback.failed_version
            await self.report_rollback(failed, f"{outcome.attempts} starts without a confirmation")
            return "rolled-back"
        if outcome.verdict is trial.Verdict.ON_TRIAL:
            self.started = time.time()
            await u.progress("trial", u.state.installed_version or "")
            return "on-trial"
        return "no-trial"

    async def roll_back(self, reason: str) -> str:
        """See :meth:`Updater.roll_back`."""
        u = self._updater
        cfg = u.config
        failed = u.reload_state().installed_version
        try:
            result = await trio.to_thread.run_sync(
                lambda: install.rollback(cfg.state_dir, cfg.app_root, reason)
            )
        except UpdaterError as e:
            await u.progress("failed", failed or "", error=f"rollback failed: {e}")
            await u.record("rollback-failed", failed, str(e))
            raise
        u.reload_state()
        await self.report_rollback(result.failed_version, reason)
        return "rolled-back"

    async def report_rollback(self, failed: str, reason: str) -> None:
        u = self._updater
        push_id = ""
        await u.progress(
            "rolled_back", u.state.installed_version or "", error=f"{failed}: {reason}"
        )
        await u.record("failed", failed, f"rolled back: {reason}", push_id)

    async def health_ok(self) -> bool:
        """True if the configured health command ran and exited 0."""
        cfg = self._updater.config
        cmd = cfg.health_command
        if not cmd:
            return False
        try:
            with trio.move_on_after(max(cfg.health_interval, 1.0) * 5):
                proc = await trio.run_process(
                    list(cmd),
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=str(cfg.cwd or cfg.app_root),
                )
                return proc.returncode == 0
        except OSError as e:
            log.warning("health command failed to run: %s", e)
        return False

    async def watch(self, *, alive: Callable[[], bool] | None = None) -> str:
        """See :meth:`Updater.watch_trial`."""
        u = self._updater
        cfg = u.config
        started = self.started or time.time()
        while True:
            s = u.reload_state()
            deadline = u.trial_deadline(s)
            if deadline is None:
                return "committed" if self.confirmed.is_set() else "no-trial"
            now = time.time()
            if self.confirmed.is_set() and await trio.to_thread.run_sync(self.commit_sync):
                return "committed"
            if alive is not None and not alive():
                return await u.roll_back("the new version exited during its trial")
            if cfg.confirm_after is not None and now - started >= cfg.confirm_after:
                await trio.to_thread.run_sync(self.commit_sync)
                return "committed"
            if await self.health_ok():
                await trio.to_thread.run_sync(self.commit_sync)
                return "committed"
            if now >= deadline:
                return await u.roll_back(f"not confirmed within {cfg.trial_seconds:g}s")
            await trio.sleep(min(cfg.health_interval, max(0.05, deadline - now), 0.5))
