"""What the supervised app says about its users, and what it is told back (issue 12, part 3).

:class:`ActivityBoard` is the owner's one record of the app's activity:

* the app reports it over the control socket
  (``fleetpush.client.local.report_activity(users=N)``: op
  ``report_activity``), and/or the agent runs ``busy_command`` (agent.toml),
  which prints a number of users; the newest known report wins;
* every report wakes the activity gate (activity_gate.py), so an app saying
  0 users ends a wait at once;
* the gate posts the *pending update* notice here (version, when it starts,
  why), which the app reads with ``local.wait_update_pending`` /
  ``local.on_update_pending`` (a long poll: op ``update_pending``), an
  embedded app through ``Updater(on_update_pending=...)``, and ``status``
  shows.

A ``busy_command`` that fails, times out or prints anything but a whole
number >= 0 is unknown activity (activity_policy.py says what that means),
logged once until it works again.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from .activity_policy import Activity
from .local import CODE_USAGE, ControlError

log = logging.getLogger("fleetpush.client.activity")

#: Longest wait one ``update_pending`` request may ask for (seconds).
MAX_PENDING_WAIT: Final = 60.0
#: Bytes of busy_command output read (a number needs few).
MAX_BUSY_OUTPUT: Final = 4096


def parse_users(text: str) -> int | None:
    """A whole number >= 0 from ``busy_command``'s output, else None."""
    words = text.split()
    if len(words) != 1:
        return None
    try:
        value = int(words[0])
    except ValueError:
        return None
    return value if value >= 0 else None


def _whole_users(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ControlError(f"users must be a whole number >= 0, got {value!r}", CODE_USAGE)
    return value


class ActivityBoard:
    """The app's activity and the pending-update notice (see the module docstring)."""

    def __init__(
        self,
        *,
        busy_command: tuple[str, ...] | None = None,
        busy_timeout: float = 5.0,
        cwd: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.busy_command = busy_command
        self.busy_timeout = busy_timeout
        self.cwd = cwd
        self._clock = clock
        self._reported = Activity()
        self._polled = Activity()
        self._command_failing = False
        self._changed = trio.Event()
        #: the pending update told to the app, and its sequence number.
        self.notice: dict[str, Any] | None = None
        self.seq = 0
        self._notice_changed = trio.Event()

    # --- activity ---------------------------------------------------------------------

    @property
    def latest(self) -> Activity:
        """The newer of the app's report and the last busy_command reading."""
        a, b = self._reported, self._polled
        if a.time is None:
            return b
        if b.time is None:
            return a
        return a if a.time >= b.time else b

    def report(self, users: int, source: str = "report") -> Activity:
        """Take a report (the control socket's ``report_activity``); wakes the gate."""
        self._reported = Activity(users=users, time=self._clock(), source=source)
        self._wake()
        return self._reported

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Return at the next report (or notice change)."""
        await self._changed.wait()

    async def refresh(self) -> Activity:
        """Run ``busy_command`` if configured, then :attr:`latest`."""
        if self.busy_command:
            users = await self._run_busy_command(self.busy_command)
            # A failed reading is unknown activity, not the report before it.
            self._polled = Activity(users=users, time=self._clock(), source="busy_command")
            if users is None:
                return Activity(source="busy_command")
        return self.latest

    async def _run_busy_command(self, cmd: tuple[str, ...]) -> int | None:
        what: str | None = None
        users = None
        with trio.move_on_after(self.busy_timeout) as scope:
            try:
                done = await trio.run_process(
                    list(cmd),
                    capture_stdout=True,
                    stderr=subprocess.DEVNULL,
                    stdin=b"",
                    check=False,
                    cwd=str(self.cwd) if self.cwd else None,
                )
            except OSError as e:
                what = f"cannot run it: {e.strerror or e}"
            else:
                out = done.stdout[:MAX_BUSY_OUTPUT].decode(errors="replace")
                users = parse_users(out) if done.returncode == 0 else None
                if done.returncode != 0:
                    what = f"it exited with code {done.returncode}"
                elif users is None:
                    what = f"it printed {out.strip()[:40]!r}, not a number of users"
        if scope.cancelled_caught:
            what = f"no answer within {self.busy_timeout:g}s"
        if what is None:
            if self._command_failing:
                log.info("busy_command works again: %d users", users)
            self._command_failing = False
        elif not self._command_failing:  # logged once until it works again
            self._command_failing = True
            log.warning("fleetpush: busy_command %s: %s [activity counts as unknown]", cmd[0], what)
        return users

    # --- the pending-update notice ---------------------------------------------------------

    def post_notice(self, notice: dict[str, Any] | None) -> None:
        """Tell the app (None: nothing pending any more)."""
        if notice == self.notice:
            return
        self.notice = notice
        self.seq += 1
        self._notice_changed.set()
        self._notice_changed = trio.Event()

    async def wait_notice(self, after: int, timeout: float) -> dict[str, Any]:
        """The notice once its sequence passes ``after``, or the current one at ``timeout``."""
        with trio.move_on_after(timeout):
            while self.seq <= after:
                await self._notice_changed.wait()
        return {"seq": self.seq, "pending": self.notice}

    # --- the control socket -------------------------------------------------------------

    def describe(self) -> dict[str, Any] | None:
        """``status``'s ``activity``: the latest report, with the pending update."""
        a = self.latest
        if a.time is None and self.notice is None:
            return None
        return {
            "users": a.users,
            "time": None if a.time is None else round(a.time, 3),
            "source": a.source or None,
            "pending_update": self.notice,
        }

    async def on_report(self, args: dict[str, Any]) -> dict[str, Any]:
        """Op ``report_activity``: ``{"users": N}``. Raises ControlError (bad users)."""
        a = self.report(_whole_users(args.get("users")))
        assert a.time is not None
        return {"users": a.users, "time": round(a.time, 3)}

    async def on_pending(self, args: dict[str, Any]) -> dict[str, Any]:
        """Op ``update_pending``: ``{"after": seq, "wait": seconds}`` (a long poll).

        Answers ``{"seq", "pending"}`` once the notice's sequence passes
        ``after`` (at once for ``after`` < 0 or left out), else after ``wait``
        (at most :data:`MAX_PENDING_WAIT`). Raises ControlError (bad fields).
        """
        after = args.get("after", -1)
        wait = args.get("wait", 0.0)
        if not isinstance(after, int) or isinstance(after, bool):
            raise ControlError(f"after must be a whole number, got {after!r}", CODE_USAGE)
        if (
            not isinstance(wait, int | float)
            or isinstance(wait, bool)
            or not math.isfinite(wait)
            or wait < 0
        ):
            raise ControlError(f"wait must be a number of seconds >= 0, got {wait!r}", CODE_USAGE)
        return await self.wait_notice(after, min(float(wait), MAX_PENDING_WAIT))


__all__ = ["MAX_PENDING_WAIT", "ActivityBoard", "parse_users"]
