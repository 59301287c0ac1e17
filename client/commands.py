"""The updater's handlers of the releaser's push commands (specs/PROTOCOL.md §7.4).

``__force_update__`` downloads, verifies and stages a release, then applies it
unless ``restart`` is false (a "stage" push); ``__apply_update__`` applies the
staged release, downloading it first if it is not staged yet. The command is
acknowledged at once and carried out in the updater's nursery; its progress
and outcome are reported as ``update_progress``.

These functions are the bodies of ``Updater._on_command`` (the session's
command callback) and ``Updater._run_command``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.messages import Ack, UpdateCommand

if TYPE_CHECKING:
    from .updater import Updater

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


async def accept_command(updater: Updater, method: str, cmd: UpdateCommand) -> Ack:
    """Acknowledge ``cmd`` at once and start it in the background, or refuse it."""
    u = updater
    if cmd.app != u.config.app:
        return Ack(accepted=False, reason=f"this device runs {u.config.app!r}")
    if u._nursery is None:
        return Ack(accepted=False, reason="updater not running")
    if u._busy_version == cmd.version:
        return Ack(accepted=True, reason="already in progress")
    u._nursery.start_soon(u._run_command, method, cmd)
    return Ack(accepted=True)


async def run_command(updater: Updater, method: str, cmd: UpdateCommand) -> None:
    """Carry out an accepted command; failures are logged and kept in ``last_error``."""
    u = updater
    try:
        if method == "__apply_update__":
            s = u.reload_state()
            if s.staged is not None and s.staged.version == cmd.version:
                await u.apply(cmd.version, push_id=cmd.push_id, forced=True)
                return
        # __force_update__ (restart=False is "stage": download only), or an
        # apply of something not staged yet: download first.
        # An operator push clears the bad mark: the engine re-tries it once.
        restart = True if method == "__apply_update__" else cmd.restart
        await u.update(
            cmd.version,
            push_id=cmd.push_id,
            forced=True,
            restart=restart,
            timeout=max(u.config.check_timeout, 10.0),
        )
    except FleetpushError as e:
        log.warning("%s %s failed: %s", method, cmd.version, e)
        u.last_error = str(e)
