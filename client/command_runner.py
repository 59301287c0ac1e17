"""Acting on the releaser's ``__force_update__``/``__apply_update__`` commands.

commands.py decides (pure: accept, hold, restart); this module does what the
decision says: it checks the command's freshness, persists an accepted push
before answering, and carries the update out in the background. It is given
the :class:`~fleetpush.client.context.UpdateContext`, the
:class:`~fleetpush.client.forced_push.ForcedPushes` and the updater's
``update``/``apply`` as callables, never the updater (STYLE.md §8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.messages import Ack, UpdateCommand

from . import commands, freshness
from .context import UpdateContext
from .forced_push import ForcedPushes, UpdateFn

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


class ApplyFn(Protocol):
    """Apply a staged version (the updater's ``apply``); raises what the host raises."""

    async def __call__(
        self, version: str, *, push_id: str = "", forced: bool | None = None
    ) -> None: ...


class CommandRunner:
    """The session's command callback and the background work it starts."""

    def __init__(
        self,
        ctx: UpdateContext,
        pushes: ForcedPushes,
        *,
        update: UpdateFn,
        apply: ApplyFn,
        busy_version: Callable[[], str | None],
        on_error: Callable[[str], None],
    ) -> None:
        self._ctx = ctx
        self._pushes = pushes
        self._update = update
        self._apply = apply
        self._busy_version = busy_version
        self._on_error = on_error

    async def on_command(self, method: str, cmd: UpdateCommand) -> Ack:
        """Persist, answer, work in the background.

        The push is persisted (fsynced) before the ack: the releaser treats an
        accepted push as the device's to finish (specs/PROTOCOL.md §7.4), so a
        kill right after the ack must not lose it (issue 10, item 10). A push
        the device already holds is acknowledged again, not started twice.
        """
        ctx = self._ctx
        refusal = await freshness.command_refusal(ctx, method, cmd)
        if refusal is not None:  # §7.4, §8.6: not signed for this connection
            log.warning("%s %s refused: %s", method, cmd.version, refusal)
            return Ack(accepted=False, reason=refusal)
        cmd = attrs.evolve(cmd, freshness=None)  # checked; never persisted
        try:
            state = await trio.to_thread.run_sync(ctx.store.reload)
        except FleetpushError as e:
            return Ack(accepted=False, reason=f"cannot read the device state: {e}")
        decision = commands.accept(
            cmd,
            app=ctx.config.app,
            running=ctx.spawner.running,
            busy_version=self._busy_version(),
            holds=commands.held(cmd, state),
        )
        if decision.ack.accepted and not decision.start:
            self._pushes.maybe_resume()  # a held push left by a kill or a lost link
        if not decision.start:
            return decision.ack
        if not commands.applies_staged(method, cmd, state):
            try:
                await self._pushes.remember(
                    cmd.version, cmd.push_id, commands.restart_for(method, cmd), True
                )
            except FleetpushError as e:
                log.warning("%s %s: cannot persist the push: %s", method, cmd.version, e)
                return Ack(accepted=False, reason=f"cannot persist the push: {e}")
        ctx.spawner.start_soon(partial(self.run, method, cmd))
        return decision.ack

    async def run(self, method: str, cmd: UpdateCommand) -> None:
        """Carry out an accepted command; failures are logged and given to ``on_error``."""
        try:
            if commands.applies_staged(method, cmd, self._ctx.store.reload()):
                await self._apply(cmd.version, push_id=cmd.push_id, forced=True)
                return
            await self._update(
                cmd.version,
                push_id=cmd.push_id,
                forced=True,
                restart=commands.restart_for(method, cmd),
                timeout=max(self._ctx.config.check_timeout, 10.0),
            )
        except FleetpushError as e:
            log.warning("%s %s failed: %s", method, cmd.version, e)
            self._on_error(str(e))


__all__ = ["ApplyFn", "CommandRunner"]
