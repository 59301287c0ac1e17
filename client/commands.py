"""The releaser's push commands, decided (specs/PROTOCOL.md §7.4).

``__force_update__`` downloads, verifies and stages a release, then applies it
unless ``restart`` is false (a "stage" push); ``__apply_update__`` applies the
staged release, downloading it first if it is not staged yet. The command is
persisted (fsynced) before it is acknowledged, then carried out in the
background; its progress and outcome are reported as ``update_progress``.

The releaser sends a push again when the device reconnects while the push is
accepted but unfinished (specs/PROTOCOL.md §7.4): a command for a push the
device already holds (its pending push, or staged) is acknowledged without a
second download.

These are pure decisions over the command and the device's state;
command_runner.py acts on them (``CommandRunner.on_command`` / ``run``).
"""

from __future__ import annotations

from typing import Final

import attrs
from fleetpush.protocol.messages import Ack, UpdateCommand

from .state import DeviceState

#: ``DeviceState.extra`` key of the persisted push (forced_push.PENDING_PUSH;
#: restated here so this pure module imports no step module).
PENDING_PUSH: Final = "pending_push"

#: The method that applies a staged release (specs/PROTOCOL.md §7.4).
APPLY: Final = "__apply_update__"


@attrs.frozen(kw_only=True)
class Acceptance:
    """The answer to a command, and whether to start carrying it out."""

    ack: Ack
    start: bool


def held(cmd: UpdateCommand, state: DeviceState) -> str | None:
    """Why the device already holds the push ``cmd`` repeats, or None if it does not.

    A push is held once persisted (``pending_push`` in ``state.extra``, see
    forced_push.py) until it is staged; then the staged record carries its id.
    """
    if not cmd.push_id:
        return None  # an old releaser's command names no push: nothing to match
    pending = state.extra.get(PENDING_PUSH)
    if (
        isinstance(pending, dict)
        and pending.get("push_id") == cmd.push_id
        and pending.get("version") == cmd.version
    ):
        return "already held"
    staged = state.staged
    if staged is not None and staged.push_id == cmd.push_id and staged.version == cmd.version:
        return "already staged"
    return None


def accept(
    cmd: UpdateCommand,
    *,
    app: str,
    running: bool,
    busy_version: str | None,
    holds: str | None = None,
) -> Acceptance:
    """Acknowledge ``cmd`` (to be started in the background), or refuse it.

    ``holds`` is :func:`held`'s answer: a repeated push is acknowledged again
    and not started a second time.
    """
    if cmd.app != app:
        return Acceptance(ack=Ack(accepted=False, reason=f"this device runs {app!r}"), start=False)
    if not running:
        return Acceptance(ack=Ack(accepted=False, reason="updater not running"), start=False)
    if holds is not None:
        return Acceptance(ack=Ack(accepted=True, reason=holds), start=False)
    if busy_version == cmd.version:
        return Acceptance(ack=Ack(accepted=True, reason="already in progress"), start=False)
    return Acceptance(ack=Ack(accepted=True), start=True)


def applies_staged(method: str, cmd: UpdateCommand, state: DeviceState) -> bool:
    """True if ``cmd`` only has to apply what is staged already (no download)."""
    return method == APPLY and state.staged is not None and state.staged.version == cmd.version


def restart_for(method: str, cmd: UpdateCommand) -> bool | None:
    """Whether the update a command starts is applied once staged.

    ``__force_update__`` with ``restart=False`` is "stage": download only;
    None is the release's own setting. An apply of something not staged yet
    downloads first, then applies. (An operator push clears the bad mark:
    the engine re-tries it once.)
    """
    return True if method == APPLY else cmd.restart
