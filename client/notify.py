"""Tell a CLI app's user that an update is available: at most once a day, never in the way.

Apps run by ``fleetpush agent`` can show their users what npm's
update-notifier shows (issue 11, "The app can see updates")::

    from fleetpush.client import notify
    notify.notify_update()        # or, from a shell script: fleetpush notify-update

prints, on stderr and only when the device's owner knows a newer release::

    ╭──────────────────────────────────╮
    │ Update available: 1.0.0 -> 1.1.0 │
    ╰──────────────────────────────────╯

The facts come from the owner's status over the control socket
(client/local.py: ``version``, ``latestVersion``, ``updateAvailable``);
nothing asks the releaser. The notice is silenced by ``quiet`` or by
``FLEETPUSH_NO_UPDATE_NOTIFY=1``, and shown at most once per
:data:`NOTIFY_INTERVAL`: the time of the last notice is kept in
``notify-update.json`` beside the control socket (the owner's state dir),
written atomically. :func:`notice` is the pure decision.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TextIO

from . import local
from .errors import FilesystemError
from .fsutil import atomic_write_json

#: Environment variable that silences the notice (any non-empty value but "0").
SILENCE_ENV: Final = "FLEETPUSH_NO_UPDATE_NOTIFY"
#: Seconds between two notices.
NOTIFY_INTERVAL: Final = 24 * 3600.0
#: The file, beside the control socket, that remembers the last notice.
STAMP_NAME: Final = "notify-update.json"


def silenced(env: Mapping[str, str]) -> bool:
    value = env.get(SILENCE_ENV, "")
    return value not in ("", "0")


def notice(
    status: Mapping[str, Any], last_notice: float | None, now: float, *, quiet: bool = False
) -> str | None:
    """The line to show, or None (pure: the owner's status and the last notice's time in).

    Shown when the owner says an update may be installed, the newest version
    differs from the running one, and no notice was shown in the last
    :data:`NOTIFY_INTERVAL` seconds.
    """
    if quiet:
        return None
    installed, latest = status.get("version"), status.get("latestVersion")
    if status.get("updateAvailable") is not True or not latest or latest == installed:
        return None
    if last_notice is not None and 0 <= now - last_notice < NOTIFY_INTERVAL:
        return None
    return f"Update available: {installed or 'none'} -> {latest}"


def box(line: str) -> str:
    """``line`` in a rounded box, as update notifiers draw it."""
    bar = "─" * (len(line) + 2)
    return f"╭{bar}╮\n│ {line} │\n╰{bar}╯"


def _read_stamp(path: Path) -> float | None:
    """When the last notice was shown; None if never (or the file is unreadable)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = doc.get("time") if isinstance(doc, dict) else None
    return float(value) if isinstance(value, int | float) else None


def notify_update(
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    now: float | None = None,
) -> str | None:
    """Show the update notice on ``stream`` (stderr) if it is due; return what was shown.

    Raises :class:`~fleetpush.client.local.NoOwner` (no owner answers on the
    control socket) or :class:`~fleetpush.client.local.ControlError`. A
    notice that cannot be remembered (read-only state dir) is still shown:
    the user is told rather than silenced by a disk problem.
    """
    env = os.environ if env is None else env
    if quiet or silenced(env):
        return None
    now = time.time() if now is None else now
    sock = local.socket_path(state_dir)
    stamp = sock.parent / STAMP_NAME
    line = notice(local.status(path=sock), _read_stamp(stamp), now)
    if line is None:
        return None
    out = sys.stderr if stream is None else stream
    print(box(line), file=out, flush=True)
    with contextlib.suppress(FilesystemError):
        atomic_write_json(stamp, {"time": now, "line": line}, mode=0o600)
    return line


__all__ = ["NOTIFY_INTERVAL", "SILENCE_ENV", "box", "notice", "notify_update", "silenced"]
