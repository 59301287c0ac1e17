"""The supervised app's messages (§7.6 ``app_status``, §7.7 ``app_control``, ``app_logs``).

Split out of messages.py, which re-exports every name here, so callers keep
importing them from there.
"""

from __future__ import annotations

from typing import Final

from attrs import field, frozen
from attrs.validators import max_len, optional

from .validators import COUNT, int_range, one_of

APP_STATES: Final = ("starting", "running", "stopping", "stopped", "error")


@frozen(kw_only=True)
class AppStatus:
    """Supervised app status, sent by ``fleetpush agent`` (§7.6)."""

    state: str = field(validator=one_of(APP_STATES))
    #: a process id (u32 on every OS fleetpush runs on)
    pid: int | None = field(default=None, validator=optional(int_range(0, 0xFFFFFFFF)))
    uptime: float = 0.0
    #: negative for a signal (POSIX), up to u32 on Windows (NTSTATUS codes)
    exit_code: int | None = field(default=None, validator=optional(int_range(-(2**31), 0xFFFFFFFF)))
    error: str | None = None
    log_tail: list[str] = field(factory=list)


#: What an operator may ask a supervised app to do (§7.7 ``app_control``).
APP_ACTIONS: Final = ("start", "stop", "restart")
#: Most log lines in one answer or one ``app_log`` notification (§7.7).
MAX_LOG_LINES: Final = 1000
#: Longest log line carried; longer ones are cut (the agent's tail cuts them too).
MAX_LOG_LINE: Final = 4096
#: Most devices one ``app_control`` names (a group may reach more: each is asked).
MAX_APP_TARGETS: Final = 1000


@frozen(kw_only=True)
class AppControl:
    """``app_control`` (operator): start, stop or restart the apps of some devices."""

    action: str = field(validator=one_of(APP_ACTIONS))
    devices: list[str] = field(factory=list, validator=max_len(MAX_APP_TARGETS))
    group: str | None = None


@frozen(kw_only=True)
class AppControlOutcome:
    device_id: str
    ok: bool
    #: why not, one sentence (not connected, no supervisor, the app failed to start...).
    error: str | None = None
    status: AppStatus | None = None


@frozen(kw_only=True)
class AppControlResult:
    results: list[AppControlOutcome]


@frozen(kw_only=True)
class AppCommand:
    """``__app_control__`` (releaser -> device): what to do; answered with AppStatus."""

    action: str = field(validator=one_of(APP_ACTIONS))


@frozen(kw_only=True)
class AppLogs:
    """``app_logs`` (operator) and ``__app_logs__`` (releaser -> device)."""

    #: the operator's only; empty on the releaser -> device request.
    device_id: str = ""
    lines: int = field(default=100, validator=int_range(0, MAX_LOG_LINES))
    #: keep sending new lines (``app_log``) until told otherwise (§7.7).
    follow: bool = False


@frozen(kw_only=True)
class AppLogLines:
    """Lines of a supervised app's output: an answer, or an ``app_log`` notification."""

    lines: list[str] = field(factory=list, validator=max_len(MAX_LOG_LINES))
    #: lines the device left out since the previous batch (rate and size caps, §7.7).
    dropped: int = field(default=0, validator=COUNT)
    device_id: str = ""
