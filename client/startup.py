"""What the updater does as it starts: recover, settle the trial, apply what is staged.

A kill or a re-exec can leave an install half done, a new version on trial or
an update staged (specs/PROTOCOL.md §7.8); :func:`startup` settles each before
the updater goes on, and :func:`watch_trial` is the embedded updater's trial
task. Both are given the :class:`~fleetpush.client.context.UpdateContext`, the
host, the trial and the updater's ``apply`` as a callable, never the updater
(STYLE.md §8).
"""

from __future__ import annotations

import logging
from functools import partial

import trio
from fleetpush.protocol.errors import FleetpushError

from . import install
from .command_runner import ApplyFn
from .context import UpdateContext
from .data_settings import DataSettings
from .hosts import Host
from .trial_watch import TrialWatch

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


async def startup(ctx: UpdateContext, host: Host, trial: TrialWatch, apply: ApplyFn) -> None:
    """Recover, then settle the trial and any staged update (embedded mode).

    Raises FleetpushError from recovery or a rollback (logged by the updater's run()).
    """
    cfg = ctx.config
    keep = DataSettings.of(cfg).retention  # keep_backups / backup_max_age
    done = await trio.to_thread.run_sync(
        lambda: install.recover(cfg.state_dir, cfg.app_root, retention=keep)
    )
    if done is not None:
        log.warning("recovered an interrupted %s: %s", done.op, done.action)
        if not host.supervises:
            # Embedded: this process loaded the app's files before recovery
            # changed them; start again on what is now installed (found by
            # tests/hostile/test_hostile_kill_matrix.py, rollback steps).
            await host.restart_after_rollback(ctx)
            return
    if host.supervises:
        # The agent counts starts and watches trials itself; a staged
        # update is applied before its first start of the app.
        s = ctx.store.reload()
        if s.staged is not None and not s.is_bad(s.staged.version) and not s.staged.held:
            log.info("%s is staged: applying it before starting the app", s.staged.version)
            await _apply_staged(apply, s.staged.version)
        return
    verdict = await trial.begin_start()
    if verdict == "rolled-back":
        await host.restart_after_rollback(ctx)
        return
    s = ctx.store.reload()
    if (
        verdict == "no-trial"
        and s.staged is not None
        and not s.is_bad(s.staged.version)
        and not s.staged.held  # an operator's stage waits for their apply
    ):
        log.info("%s is staged: applying it now", s.staged.version)
        ctx.spawner.start_soon(partial(_apply_staged, apply, s.staged.version))


async def _apply_staged(apply: ApplyFn, version: str) -> None:
    try:
        await apply(version)
    except FleetpushError as e:
        log.warning("applying staged %s failed: %s", version, e)


async def watch_trial(ctx: UpdateContext, host: Host, trial: TrialWatch) -> None:
    """Watch the version on trial; restart on what is installed if it was rolled back."""
    try:
        outcome = await trial.watch()
    except FleetpushError as e:
        log.error("trial: %s", e)
        return
    if outcome == "rolled-back":
        await host.restart_after_rollback(ctx)


__all__ = ["startup", "watch_trial"]
