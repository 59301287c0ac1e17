"""How a staged update reaches the running app: the :class:`Host` interface.

The updater asks its host to apply a staged version and to restart after a
rollback. :class:`ReexecHost` is the embedded mode: it re-executes
(``os.execv``) into ``python -m fleetpush.client.applymode``, which runs the
install engine and then executes the app's saved command line again. Under
``fleetpush agent`` the supervisor supplies its own host (agent.py), which
applies between stopping and starting the child; ``fleetpush update`` has one
too (cli/device_cmd.py).

Everything hosts differ in is declared by :class:`Host`, so the updater asks
``host.supervises`` rather than probing. A host is given the
:class:`~fleetpush.client.context.UpdateContext`, never the updater.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Protocol

import trio

from .context import UpdateContext
from .data_settings import DataSettings
from .env_step import prepare_env
from .layout import StateLayout
from .pyenv import reexec_target

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


class Host(Protocol):
    """How updates reach the running app: embedded re-exec, or the agent's child."""

    #: True: the host starts the app itself (the agent, ``fleetpush update``):
    #: it counts starts and watches trials, and a staged update is applied
    #: before its first start. False: the updater runs inside the app
    #: (embedded) and does both itself, restarting the process after a
    #: rollback or a recovery.
    supervises: bool

    async def apply(self, ctx: UpdateContext, version: str) -> None:
        """Install staged ``version`` and run it (may never return: execv).

        Failures are reported (``ctx.reporter``) and raised as UpdaterError.
        """

    async def restart_after_rollback(self, ctx: UpdateContext) -> None:
        """The installed files were rolled back: run the restored version."""


def _saved_argv() -> tuple[str, list[str]]:
    """The executable and argv that re-create this process (interpreter flags kept)."""
    return sys.executable, [sys.executable, *sys.orig_argv[1:]]


class ReexecHost:
    """Embedded mode: re-exec into apply mode, which execs this same command line after."""

    supervises = False

    def __init__(self, argv: list[str] | None = None, executable: str | None = None) -> None:
        exe, default = _saved_argv()
        self.executable = executable or exe
        self.argv = argv or default

    async def apply(self, ctx: UpdateContext, version: str) -> None:
        # Imported here: `python -m fleetpush.client.applymode` imports this
        # package first, and must not find itself already imported.
        from .applymode import reexec_into_apply_mode, write_saved_args

        cfg = ctx.config
        # Built while this process still serves: a release whose env fails
        # leaves it running, untouched (env_step.py).
        if not await prepare_env(ctx, version):
            return
        await trio.to_thread.run_sync(
            lambda: write_saved_args(
                cfg.state_dir, version, self.argv, self.executable, os.getcwd(),
                data=DataSettings.of(cfg),  # issue 12: data backed up and migrated there too
            )
        )
        await ctx.reporter.progress("restarting", version)
        log.info("re-executing into apply mode for %s", version)
        reexec_into_apply_mode(cfg.state_dir, cfg.app_root, version)

    async def restart_after_rollback(self, ctx: UpdateContext) -> None:
        log.warning("rolled back: restarting into the restored version")
        sys.stdout.flush()
        sys.stderr.flush()
        # The restored version's env: the failed one's may be pruned already.
        exe, argv = reexec_target(
            StateLayout.of(ctx.config.state_dir), self.executable, self.argv
        )
        os.execv(exe, argv)  # noqa: S606 - our own command line
