"""The activity gate: the first step of an apply, before anything is prepared or stopped.

``Updater.apply`` awaits :meth:`ActivityGate.wait` before it hands the
staged version to its host (the agent's ``AgentHost.apply`` takes the agent's
lock only after), so a wait of hours holds no lock: pushes, status, rollbacks
and the app's own reports go on meanwhile. Agreed order of the steps (issue
12): activity gate → preparing_env → schema check → backing_up → stopping →
installing → migrating → starting → trial.

The loop, until activity_policy.evaluate says go:

* read the activity (activity.py: the app's last report, or a fresh
  ``busy_command`` reading) and evaluate the policy;
* notify-and-wait: post the pending-update notice (the app sees it on the
  control socket, an embedded app through its callback), once per update;
* wait: report ``deferred`` with the reason in ``error`` (specs/PROTOCOL.md
  §7.6) at each look; the reporter sends only what the releaser has not
  heard (a new reason, or the same after a reconnect), so the event log gets
  one line per change, not one per poll;
* an update that is no longer the staged one (a newer push staged another
  version meanwhile, or another apply installed it) leaves the gate with
  ``None``: the caller applies nothing;
* sleep until a report arrives, the verdict's own time comes (the notice
  runs out, the window opens, the force deadline passes) or ``poll``
  seconds pass (a busy_command is read again, a report goes stale).

Given plain callables and the board, never the updater (STYLE.md §8).
The force deadline counts from the first time this process held the update
at the gate; an agent restarted meanwhile starts that count again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import tzinfo
from typing import Any, Final, Protocol

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError

from .activity import ActivityBoard
from .activity_policy import Action, Policy, Verdict, Waiting, Window, evaluate
from .config import UpdaterConfig
from .state import DeviceState

log = logging.getLogger("fleetpush.client.activity")

#: ``report(version, push_id, reason)``: the ``deferred`` progress report.
ReportDeferred = Callable[[str, str, str], Awaitable[None]]
#: Told the pending update (version, starts_at, users, reason); embedded apps.
OnPending = Callable[[dict[str, Any]], object]

#: How often a gate asks an embedded app's can_update() again, at least: it
#: is asked, not told, so it is looked at as often as before the gate.
ASK_POLL: Final = 1.0


def policy_of(config: UpdaterConfig) -> Policy:
    """The gate's policy from the device config (agent.toml)."""
    window = config.maintenance_window
    return Policy(
        notify_below=config.notify_below,
        notify_wait=config.notify_wait,
        wait_at=config.wait_at,
        max_age=config.activity_max_age,
        unknown=config.activity_unknown,
        force_deadline=config.force_deadline,
        window=None if window is None else Window.parse(window),
    )


def still_staged(state: DeviceState, version: str) -> bool:
    """``version`` is still the one to apply: staged, neither superseded by a
    newer staged release nor installed by another apply meanwhile."""
    if state.staged is not None:
        return state.staged.version == version
    return state.installed_version != version


class _Reports(Protocol):
    async def progress(
        self, state: str, version: str = "", *, push_id: str = "", error: str | None = None
    ) -> None: ...

    async def flush_history(self) -> None: ...


class _Session(Protocol):
    @property
    def connected(self) -> bool: ...
    @property
    def connects(self) -> int: ...


class DeferredReports:
    """The gate's ``report``: ``deferred`` with its reason (reporting.py's
    reporter, the releaser session).

    Sent when the reason changes and again on each new connection: a report
    sent while offline is lost, and the gate looks again every poll, so a
    reconnect soon carries it. The outcomes held before it (``staged``) are
    flushed first: the releaser records a history report as the device's
    state (§7.6.1), so one delivered after the live ``deferred`` would hide
    the reason for as long as the wait lasts.
    """

    def __init__(self, reporter: _Reports, session: _Session) -> None:
        self._reporter = reporter
        self._session = session
        self._sent: tuple[str, str, str, int] | None = None

    async def __call__(self, version: str, push_id: str, reason: str) -> None:
        link = self._session
        sent = (version, push_id, reason, link.connects if link.connected else -1)
        last = self._sent
        if last is not None and last[:3] == sent[:3] and (last[3] == sent[3] or sent[3] < 0):
            return
        self._sent = sent
        if link.connected:  # offline, a request would wait for the link
            try:
                await self._reporter.flush_history()
            except FleetpushError as e:
                log.info("history flush: %s", e)
        await self._reporter.progress("deferred", version, push_id=push_id, error=reason)


class ActivityGate:
    """Holds an apply back while the policy says so (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        board: ActivityBoard,
        *,
        report: ReportDeferred,
        app_running: Callable[[], bool],
        app_busy: Callable[[], bool] | None = None,
        on_pending: OnPending | None = None,
        poll: float = 5.0,
        clock: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
    ) -> None:
        self.policy = policy
        self.board = board
        self._report = report
        self._app_running = app_running
        self._app_busy = app_busy
        self._on_pending = on_pending
        self._poll = poll
        self._clock = clock
        self._tz = tz
        #: (version, push_id) -> when first held; kept while a wait for it runs.
        self._since: dict[tuple[str, str], float] = {}

    @classmethod
    def for_config(
        cls,
        config: UpdaterConfig,
        board: ActivityBoard,
        *,
        report: ReportDeferred,
        app_running: Callable[[], bool],
        app_busy: Callable[[], bool] | None = None,
        on_pending: OnPending | None = None,
    ) -> ActivityGate:
        """The gate agent.toml describes (``app_busy``: an embedded can_update())."""
        poll = config.activity_poll
        return cls(
            policy_of(config),
            board,
            report=report,
            app_running=app_running,
            app_busy=app_busy,
            on_pending=on_pending,
            poll=poll if app_busy is None else min(poll, ASK_POLL),
        )

    def _busy(self) -> bool:
        if self._app_busy is None:
            return False
        try:
            return bool(self._app_busy())
        except Exception:
            log.exception("can_update hook failed; treating the app as busy")
            return True

    def _tell_app(self, notice: dict[str, Any]) -> None:
        self.board.post_notice(notice)
        if self._on_pending is not None:
            try:
                self._on_pending(dict(notice))
            except Exception:
                log.exception("on_update_pending hook failed")

    def _told(self, version: str) -> bool:
        notice = self.board.notice
        return notice is not None and notice.get("version") == version

    def _notice(self) -> dict[str, Any]:
        return dict(self.board.notice or {})

    async def wait(
        self,
        version: str,
        *,
        forced: bool,
        push_id: str = "",
        wanted: Callable[[], bool] = lambda: True,
    ) -> Verdict | None:
        """Return once ``version`` may be applied: the go or go-forced verdict;
        None as soon as ``wanted()`` says it is not to be applied any more.

        Never raises for the app's reports (a broken one is unknown activity);
        cancellation leaves no notice behind.
        """
        key = (version, push_id)
        since = self._since.setdefault(key, self._clock())
        waiting = Waiting(version=version, forced=forced, since=since)
        last_reason: str | None = None
        try:
            while True:
                if not wanted():
                    log.info("update %s: superseded while it waited at the gate", version)
                    self.board.post_notice(None)
                    return None
                activity = await self.board.refresh()
                if self._busy():
                    activity = attrs.evolve(activity, busy=True)
                waiting = attrs.evolve(waiting, app_running=self._app_running())
                now = self._clock()
                verdict = evaluate(activity, waiting, self.policy, now, self._tz)
                if verdict.action is Action.NOTIFY and waiting.notified_at is None:
                    waiting = attrs.evolve(waiting, notified_at=now)
                    verdict = evaluate(activity, waiting, self.policy, now, self._tz)
                    self._tell_app(
                        {
                            "version": version,
                            "starts_at": round(verdict.until or now, 3),
                            "users": verdict.users,
                            "reason": verdict.reason,
                        }
                    )
                if verdict.goes:
                    if verdict.action is Action.GO_FORCED:
                        log.warning("update %s: %s: applying anyway", version, verdict.reason)
                    elif last_reason is not None:
                        log.info("update %s: the gate opens: %s", version, verdict.reason)
                    if self._told(version):  # it starts now, whatever was said
                        self._tell_app({**self._notice(), "starts_at": round(now, 3)})
                    return verdict
                if verdict.action is Action.WAIT and self._told(version):
                    # More users came after the notice: it is not coming at the
                    # time said any more (starts_at: the window or the deadline).
                    until = None if verdict.until is None else round(verdict.until, 3)
                    self._tell_app(
                        {
                            **self._notice(),
                            "starts_at": until,
                            "users": verdict.users,
                            "reason": verdict.reason,
                        }
                    )
                last_reason = verdict.reason
                await self._report(version, push_id, verdict.reason)
                wake = now + self._poll
                if verdict.until is not None:
                    wake = min(wake, verdict.until)
                with trio.move_on_after(max(wake - self._clock(), 0.0)):
                    await self.board.changed()
        except BaseException:
            self.board.post_notice(None)  # cancelled: nothing is coming after all
            raise
        finally:
            self._since.pop(key, None)


__all__ = [
    "ASK_POLL",
    "ActivityGate",
    "DeferredReports",
    "OnPending",
    "ReportDeferred",
    "policy_of",
    "still_staged",
]
