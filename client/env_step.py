"""The ``preparing_env`` step: build a staged release's Python env before the app stops.

Run by a supervising host (agent.py) before it stops the app, so a release
whose env cannot be built, or fails its smoke check, never stops the running
version: it is reported as ``failed`` with ``environment: <the tool's last
error line>``, the release is marked bad (a push retries it) and nothing
else happens. A full disk is not the release's fault: it is reported as
``failed`` too, but the release stays staged and is not marked bad, so the
next check (or ``fleetpush update``) builds it again once space is freed. The
build itself is pyenv.py's.
"""

from __future__ import annotations

import logging
import sys

import attrs
import trio

from . import pyenv
from .context import UpdateContext
from .errors import DiskFullError, UpdaterError
from .layout import StateLayout
from .staging import load_staged

log = logging.getLogger("fleetpush.client.env_step")


async def prepare_env(ctx: UpdateContext, version: str) -> bool:
    """Build ``version``'s env if it has one; False if that failed (reported)."""
    cfg = ctx.config
    settings = pyenv.BuildSettings(
        python=cfg.env_python or sys.executable, tool=cfg.env_builder
    )
    layout = StateLayout.of(cfg.state_dir)
    try:
        manifest = load_staged(layout, version)[2]
    except UpdaterError:
        return True  # not (properly) staged: the apply reports that itself
    if manifest.python is None or pyenv.is_complete(pyenv.env_path(layout, manifest)):
        return True
    await ctx.reporter.progress("preparing_env", version)
    try:
        path = await trio.to_thread.run_sync(
            pyenv.prepare, layout, cfg.app_root, manifest, settings
        )
    except DiskFullError as e:
        log.error("%s: %s; the installed version keeps running", version, e)
        await ctx.reporter.progress("failed", version, error=str(e))
        await ctx.reporter.record("failed", version, str(e))
        return False
    except UpdaterError as e:
        log.error("%s: %s; the installed version keeps running", version, e)
        # Marked bad like a release that failed MAX_APPLY_ATTEMPTS applies: a
        # broken lock or smoke check fails the same way every time, so later
        # checks must not rebuild it again and again. A new push retries it.
        await ctx.store.change(
            lambda s: attrs.evolve(
                s.mark_bad(version),
                staged=None if s.staged and s.staged.version == version else s.staged,
            )
        )
        await ctx.reporter.progress("failed", version, error=str(e))
        await ctx.reporter.record("failed", version, str(e))
        return False
    log.info("%s: environment ready at %s", version, path)
    return True


__all__ = ["prepare_env"]
