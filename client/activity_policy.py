"""The activity gate's decision: may an update start now? (issue 12, part 3)

A pure function in the manner of trial.py's ``evaluate``: the app's last
activity report, the update waiting at the gate, the policy and the time go
in; a :class:`Verdict` comes out. Nothing here sleeps, reads a clock, a file
or a socket; activity_gate.py acts on the verdict and activity.py gathers the
reports.

The rules, first match wins (README, "Python services", "Activity gate"):

1. the app is not running (the agent has not started it yet, or it crashed):
   nobody can be disturbed: **go**;
2. a forced push that has waited ``force_deadline`` at the gate: **go-forced**;
3. a non-forced update (a periodic check) outside the maintenance window:
   **wait for the window** (the window's older meaning, kept: automatic
   updates happen in the window only);
4. 0 users: **go**;
5. 1 … ``notify_below`` - 1 users, or any users inside the window: **notify
   the app and go** ``notify_wait`` seconds after the notice;
6. otherwise (≥ ``wait_at``; and, if ``notify_below`` is set lower,
   ``notify_below`` … ``wait_at`` - 1): **wait for the window** (or, without a
   window, for the users to drop).

Unknown activity (nothing reported, a report older than ``max_age``, or a
``busy_command`` that failed) counts as ``unknown``: ``"go"`` (the default:
an app that does not take part never holds an update back), ``"notify"``
(as 1 user) or ``"wait"`` (as ``wait_at`` users). An embedded app whose
``can_update()`` says no counts as ``wait_at`` users.

Times are seconds since the epoch. The window is in the device's local time
(``tz``; None: the process's local zone, from ``TZ`` or /etc/localtime), may
cross midnight (``22:00-02:00``) and is compared by wall-clock time of day, so
on the days a DST change skips or repeats an hour the window is shorter or
longer by that hour, never missed.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime, tzinfo
from typing import Final

from attrs import field, frozen

#: What ``unknown`` may be set to.
UNKNOWN_CHOICES: Final = ("go", "notify", "wait")

_WINDOW_RE: Final = re.compile(
    r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$"
)
_DAY: Final = 24 * 3600


def _clock(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" + (f":{s:02d}" if s else "")


@frozen(kw_only=True)
class Window:
    """A daily window, ``[start, end)`` in seconds after local midnight; may wrap."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        """``"HH:MM-HH:MM"`` (seconds optional: ``HH:MM:SS``). Raises ValueError."""
        m = _WINDOW_RE.match(text)
        if m is None:
            raise ValueError(f"maintenance_window {text!r} is not HH:MM-HH:MM")
        h1, m1, s1, h2, m2, s2 = (int(g or 0) for g in m.groups())
        if max(h1, h2) > 23 or max(m1, m2, s1, s2) > 59:
            raise ValueError(f"maintenance_window {text!r} has an invalid time")
        start, end = h1 * 3600 + m1 * 60 + s1, h2 * 3600 + m2 * 60 + s2
        if start == end:
            raise ValueError(f"maintenance_window {text!r} is empty (it starts when it ends)")
        return cls(start=start, end=end)

    @property
    def text(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"

    @staticmethod
    def _second_of_day(local: datetime) -> float:
        return local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6

    def contains(self, local: datetime) -> bool:
        t = self._second_of_day(local)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # crosses midnight

    def opens_in(self, local: datetime) -> float:
        """Seconds until the window next opens (0 inside it). Wall-clock
        arithmetic: off by the DST hour on a change day, which only makes the
        gate look again early or late, since :meth:`contains` decides."""
        if self.contains(local):
            return 0.0
        return (self.start - self._second_of_day(local)) % _DAY


def _check_unknown(_inst: object, _attr: object, value: str) -> None:
    if value not in UNKNOWN_CHOICES:
        raise ValueError(f"activity_unknown must be go, notify or wait, got {value!r}")


@frozen(kw_only=True)
class Policy:
    """The gate's settings (agent.toml; config.py validates them)."""

    notify_below: int = 3
    notify_wait: float = 60.0
    wait_at: int = 3
    #: a report older than this (seconds) is unknown activity.
    max_age: float = 300.0
    unknown: str = field(default="go", validator=_check_unknown)
    force_deadline: float = 300.0
    window: Window | None = None


@frozen(kw_only=True)
class Activity:
    """What the app last said: ``users`` at ``time`` (None: nothing known)."""

    users: int | None = None
    time: float | None = None
    #: where it came from, for the reason: ``report``, ``busy_command``...
    source: str = ""
    #: an embedded app's ``can_update()`` said no.
    busy: bool = False


@frozen(kw_only=True)
class Waiting:
    """The update at the gate."""

    version: str
    forced: bool
    #: when the gate first held it (the force deadline counts from here).
    since: float
    #: when the app was told it is coming (None: not yet).
    notified_at: float | None = None
    app_running: bool = True


class Action(enum.Enum):
    GO = "go"
    NOTIFY = "notify-and-wait"
    WAIT = "wait"
    GO_FORCED = "go-forced"


@frozen(kw_only=True)
class Verdict:
    action: Action
    #: in words an operator reads as they are (the ``deferred`` report's error).
    reason: str
    #: NOTIFY: when the update starts; WAIT: when the verdict changes by
    #: itself (the window opens, the force deadline passes), None if only a
    #: report can change it.
    until: float | None = None
    #: the users counted (None: unknown).
    users: int | None = None

    @property
    def goes(self) -> bool:
        return self.action in (Action.GO, Action.GO_FORCED)


def _users(n: int) -> str:
    return f"{n} user{'' if n == 1 else 's'} active"


def _at(when: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(when, tz).strftime("%H:%M:%S")


def _counted(activity: Activity, policy: Policy, now: float) -> tuple[int, str]:
    """(users the rules count, how to say it)."""
    if activity.busy:
        return policy.wait_at, "the app says it is busy"
    users, when = activity.users, activity.time
    if users is not None and when is not None and now - when <= policy.max_age:
        return users, _users(users)
    if users is None and activity.source == "busy_command":
        label = "activity unknown (busy_command failed)"
    elif users is None or when is None:
        label = "activity unknown (nothing reported)"
    else:
        label = f"activity unknown (last report {now - when:.0f}s old)"
    return {"go": 0, "notify": 1, "wait": policy.wait_at}[policy.unknown], label


def evaluate(
    activity: Activity, waiting: Waiting, policy: Policy, now: float, tz: tzinfo | None = None
) -> Verdict:
    """What the gate does now for ``waiting`` (pure; the rules are in the module docstring)."""
    if not waiting.app_running:
        return Verdict(action=Action.GO, reason="the app is not running", users=0)
    users, said = _counted(activity, policy, now)
    deadline = waiting.since + policy.force_deadline if waiting.forced else None
    if deadline is not None and now >= deadline:
        return Verdict(
            action=Action.GO_FORCED,
            reason=f"{said}: forced push waited {policy.force_deadline:g}s (force_deadline)",
            users=users,
        )
    window = policy.window
    local = datetime.fromtimestamp(now, tz)
    inside = window is not None and window.contains(local)

    def wait(why: str) -> Verdict:
        assert window is None or not inside
        opens = now + window.opens_in(local) if window is not None else None
        until = min((t for t in (opens, deadline) if t is not None), default=None)
        if deadline is not None:
            why = f"{why[:-1]}, forced at {_at(deadline, tz)})"
        return Verdict(action=Action.WAIT, reason=why, until=until, users=users)

    if not waiting.forced and window is not None and not inside:
        return wait(f"{said} (waiting for window {window.text})")
    if users <= 0:
        return Verdict(action=Action.GO, reason=said, users=users)
    if users < policy.notify_below or inside:
        starts = (now if waiting.notified_at is None else waiting.notified_at) + policy.notify_wait
        if now >= starts:
            return Verdict(action=Action.GO, reason=f"{said}: the app was notified", users=users)
        return Verdict(
            action=Action.NOTIFY,
            reason=f"{said} (the app is notified, update at {_at(starts, tz)})",
            until=starts,
            users=users,
        )
    if window is not None:
        return wait(f"{said} (waiting for window {window.text})")
    return wait(f"{said} (waiting for fewer than {policy.notify_below})")


__all__ = [
    "UNKNOWN_CHOICES",
    "Action",
    "Activity",
    "Policy",
    "Verdict",
    "Waiting",
    "Window",
    "evaluate",
]
