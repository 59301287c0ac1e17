"""The trial of a newly applied version: confirm and commit it, or roll it back.

A new version is on trial until confirmed: by the app (``Updater.confirm()``),
by a passing ``health_command``, or by surviving ``confirm_after`` seconds.
Otherwise, at the trial deadline, after a crash (the agent's child exiting),
or after ``max_attempts`` starts without a confirmation, it is rolled back by
the install engine (trial.py, install.py), marked bad, and the rollback is
reported live and in the history.

The rule at the deadline is one rule for the embedded updater and for
``fleetpush agent``: **a version nobody vouched for is rolled back**. What
vouches: ``confirm()``, surviving ``confirm_after``, a passing health command
or, when no health command is configured, a supervisor (the agent) that
watched *its own child* run through the whole trial without exiting or
restarting (a crash rolls back at once, and the agent's liveness check is of
its own child, never of whatever answers on the app's port). The embedded
updater has no such witness, so there only ``confirm()`` or ``confirm_after``
commits, as the install engine does with an expired trial
(trial.py's :func:`~fleetpush.client.trial.evaluate` says EXPIRED, and the
next start rolls back). A supervised app that is up for ``trial_seconds``
is therefore kept, which is what an operator running ``fleetpush agent``
with a minimal config expects; a configured health command is stricter and
wins.

:func:`decide` is the pure decision (facts in, a :class:`TrialStep` out);
:meth:`TrialWatch.watch` is the one loop that gathers the facts and acts,
used by the embedded updater and by the agent alike (the agent passes its
``watching`` and ``roll_back`` callables). The watch is given the
:class:`~fleetpush.client.context.UpdateContext`, never the updater.
"""

from __future__ import annotations

import enum
import logging
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import trio

from . import install, trial
from .context import UpdateContext
from .errors import UpdaterError
from .state import DeviceState, load_state

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


class Step(enum.Enum):
    """What the trial rules say to do now."""

    #: no trial (any more): committed or rolled back elsewhere.
    ENDED = "ended"
    COMMIT = "commit"
    ROLL_BACK = "roll-back"
    #: the decision needs the health command's result first.
    PROBE_HEALTH = "probe-health"
    WAIT = "wait"


@attrs.frozen(kw_only=True)
class TrialStep:
    step: Step
    #: why, for ROLL_BACK (reported to the releaser).
    reason: str = ""


@attrs.frozen(kw_only=True)
class TrialRules:
    """The configured trial rules (from UpdaterConfig)."""

    trial_seconds: float
    confirm_after: float | None = None
    health_check: bool = False
    #: a supervisor watches its own child: surviving the whole trial vouches for it.
    supervised: bool = False
    #: a health pass commits only once passes have lasted this long, the same
    #: child alive throughout (the agent: ``health_interval``). A child that
    #: crash-loops on "address already in use" may still be alive, not yet
    #: listening, while a stranger on its port answers the first probe; it is
    #: dead well within the hold, and its exit rolls back (issue 11).
    health_hold: float = 0.0


def decide(
    rules: TrialRules,
    *,
    now: float,
    started: float,
    deadline: float | None,
    confirmed: bool = False,
    alive: bool = True,
    healthy: bool | None = None,
    healthy_since: float | None = None,
    restarted: bool = False,
) -> TrialStep:
    """What to do with the version on trial (pure: facts in, a step out).

    ``deadline`` is None when no trial is running; ``started`` is when this
    process started the version; ``healthy`` is None until the health command
    was run for this decision; ``healthy_since`` is when the run of passing
    probes began (None: this one); ``restarted`` says the supervised child is
    not the first one started on this trial. In order: a confirmation commits; a crash
    rolls back; surviving ``confirm_after`` commits; a health check that has
    passed for ``health_hold`` commits; at the deadline a supervised child
    that is still alive, was not restarted during the trial (and no health
    command configured) commits, anything else unconfirmed rolls back (the
    module docstring explains why).
    """
    if deadline is None:
        return TrialStep(step=Step.ENDED)
    if confirmed:
        return TrialStep(step=Step.COMMIT)
    if not alive:
        return TrialStep(step=Step.ROLL_BACK, reason="the new version exited during its trial")
    if rules.confirm_after is not None and now - started >= rules.confirm_after:
        return TrialStep(step=Step.COMMIT)
    if rules.health_check:
        if healthy is None:
            return TrialStep(step=Step.PROBE_HEALTH)
        since = now if healthy_since is None else healthy_since
        if healthy and now - since >= rules.health_hold:
            return TrialStep(step=Step.COMMIT)
    if now >= deadline:
        if rules.supervised and not rules.health_check and not restarted:
            return TrialStep(step=Step.COMMIT)
        what = "health check did not pass" if rules.health_check else "not confirmed"
        why = f"{what} within {rules.trial_seconds:g}s"
        if rules.supervised and restarted and not rules.health_check:
            why += " (the app was restarted during its trial)"
        return TrialStep(step=Step.ROLL_BACK, reason=why)
    return TrialStep(step=Step.WAIT)


def trial_deadline(s: DeviceState, trial_seconds: float) -> float | None:
    """When the trial of the installed version ends (config may shorten the engine's)."""
    if s.trial is None or s.trial.version != s.installed_version:
        return None
    return min(s.trial.deadline, s.trial.started_at + trial_seconds)


class TrialWatch:
    """Confirmation, health checks and rollback of the version on trial."""

    def __init__(self, ctx: UpdateContext, *, supervised: bool = False) -> None:
        self._ctx = ctx
        cfg = ctx.config
        self.rules = TrialRules(
            trial_seconds=cfg.trial_seconds,
            confirm_after=cfg.confirm_after,
            health_check=bool(cfg.health_command),
            supervised=supervised,
            health_hold=cfg.health_interval if supervised else 0.0,
        )
        #: set by confirm() (from any thread); committed at the next chance.
        self.confirmed = threading.Event()
        #: when this process started the version on trial (for ``confirm_after``).
        self.started: float | None = None
        #: the child started last is the trial's first start (attempts == 1): a
        #: supervisor witnessed the whole trial only then.
        self.first_start = True

    def confirm(self) -> None:
        """The app is healthy: commit the version on trial. Thread-safe; idempotent.

        Raises StateError if the state cannot be read or written.
        """
        self.confirmed.set()
        self.commit_sync()

    def commit_sync(self) -> bool:
        """Commit the installed version if it is on trial; True if it was.

        Blocking (install lock, file writes): any thread. Raises StateError.
        """
        ctx = self._ctx
        s = load_state(ctx.config.state_dir)
        if s.trial is None or s.trial.version != s.installed_version:
            return False
        ctx.store.adopt(trial.confirm(ctx.config.state_dir, time.time(), s.installed_version))
        log.info("%s committed", s.installed_version)
        ctx.reporter.poke()
        return True

    def deadline(self, s: DeviceState) -> float | None:
        """When the trial of the installed version ends, or None if there is none."""
        return trial_deadline(s, self._ctx.config.trial_seconds)

    async def begin_start(self) -> str:
        """Before (re)starting the app on trial: count the start or roll back.

        Returns "no-trial", "on-trial" or "rolled-back" (the restored version
        must be started instead). Raises what :func:`install.rollback` raises.
        """
        ctx = self._ctx
        cfg = ctx.config
        s = ctx.store.reload()
        deadline = self.deadline(s)
        if deadline is not None and time.time() >= deadline:
            return await self.roll_back(f"not confirmed within {cfg.trial_seconds:g}s")
        outcome = await trio.to_thread.run_sync(
            lambda: trial.begin_start(cfg.state_dir, cfg.app_root, time.time(), cfg.max_attempts)
        )
        ctx.store.reload()
        if outcome.rollback is not None:
            failed = outcome.rollback.failed_version
            await self._report_rollback(failed, f"{outcome.attempts} starts without a confirmation")
            return "rolled-back"
        if outcome.verdict is trial.Verdict.ON_TRIAL:
            self.started = time.time()
            self.first_start = outcome.attempts <= 1
            await ctx.reporter.progress("trial", ctx.store.state.installed_version or "")
            return "on-trial"
        return "no-trial"

    async def roll_back(self, reason: str) -> str:
        """Roll the version on trial back (install engine), mark it bad, report it.

        Returns "rolled-back". Raises UpdaterError (RollbackError...) if the
        engine could not roll back (reported as ``rollback-failed``).
        """
        ctx = self._ctx
        cfg = ctx.config
        failed = ctx.store.reload().installed_version
        try:
            result = await trio.to_thread.run_sync(
                lambda: install.rollback(cfg.state_dir, cfg.app_root, reason)
            )
        except UpdaterError as e:
            await ctx.reporter.progress("failed", failed or "", error=f"rollback failed: {e}")
            await ctx.reporter.record("rollback-failed", failed, str(e))
            raise
        ctx.store.reload()
        await self._report_rollback(result.failed_version, reason)
        return "rolled-back"

    async def _report_rollback(self, failed: str, reason: str) -> None:
        ctx = self._ctx
        await ctx.reporter.progress(
            "rolled_back", ctx.store.state.installed_version or "", error=f"{failed}: {reason}"
        )
        # The install engine recorded the durable "rolled-back" outcome (running
        # version, failed version and reason): a second "failed" entry made the
        # releaser show "failed" for a device healthy on its old version, and
        # every watcher saw the rollback twice (issue 11, item 6).
        ctx.reporter.poke()

    async def health_ok(self) -> bool:
        """True if the configured health command ran and exited 0 (never raises)."""
        cfg = self._ctx.config
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

    async def watch(
        self,
        *,
        alive: Callable[[], bool] | None = None,
        watching: Callable[[], bool] | None = None,
        roll_back: Callable[[str], Awaitable[str]] | None = None,
    ) -> str:
        """Run the trial of the installed version to its end (the rules: :func:`decide`).

        ``alive`` returning False means the new version crashed: roll back at
        once. ``watching`` returning False ends the watch without acting (the
        agent: its child was stopped or replaced, whoever did that decides).
        A health probe counts only if ``watching`` held before and after it:
        a result obtained while the child changed or died is nobody's.
        ``roll_back`` does the rollback (default :meth:`roll_back`; the agent
        stops its child around it). Returns "committed", "rolled-back",
        "no-trial" or "ended". Raises what ``roll_back`` raises, or StateError.
        """
        cfg = self._ctx.config
        started = self.started or time.time()
        restarted = not self.first_start
        #: when the current run of passing health probes began.
        passing_since: float | None = None
        while True:
            if watching is not None and not watching():
                return "ended"
            deadline = self.deadline(self._ctx.store.reload())
            now = time.time()
            ask = partial(
                decide,
                self.rules,
                now=now,
                started=started,
                deadline=deadline,
                confirmed=self.confirmed.is_set(),
                alive=alive is None or alive(),
                restarted=restarted,
            )
            verdict = ask()
            if verdict.step is Step.PROBE_HEALTH:
                healthy = await self.health_ok()
                if watching is not None and not watching():
                    return "ended"  # the child changed during the probe
                if not healthy:
                    passing_since = None
                elif passing_since is None:
                    passing_since = now
                verdict = ask(
                    healthy=healthy,
                    healthy_since=passing_since,
                    alive=alive is None or alive(),
                )
            if verdict.step is Step.ENDED:
                return "committed" if self.confirmed.is_set() else "no-trial"
            if verdict.step is Step.COMMIT:
                await trio.to_thread.run_sync(self.commit_sync)
                return "committed"
            if verdict.step is Step.ROLL_BACK:
                return await (roll_back or self.roll_back)(verdict.reason)
            assert deadline is not None
            await trio.sleep(min(cfg.health_interval, max(0.05, deadline - now), 0.5))
