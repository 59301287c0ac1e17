"""Staging an update: download and verify a trusted release into updates/<version>.

The download is chunk-verified and resumable (download.py); once every file
is in place it is marked STAGED (staging.py) and recorded in the device
state, in the same atomic write that drops a pending forced push of that
version (forced_push.py). A release already staged is not downloaded again.
Every failure is reported as ``failed`` and recorded in the history, except a
resumable one of a forced update that will be retried.

:func:`stage` takes the :class:`~fleetpush.client.context.UpdateContext`
and returns what was staged and what the download did.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Final

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.trust import VerifiedManifest

from .context import UpdateContext
from .download import DownloadResult, download
from .errors import UpdaterError
from .forced_push import RESUMABLE, without_pending
from .staging import load_staged_manifest, mark_staged
from .state import StagedInfo

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")

#: Progress notifications while downloading are sent at most this often.
PROGRESS_INTERVAL: Final = 0.25


@attrs.frozen(kw_only=True)
class StageResult:
    """What :func:`stage` did."""

    staged: StagedInfo
    #: None if the release was staged already (nothing downloaded).
    download: DownloadResult | None = None


async def stage(
    ctx: UpdateContext,
    verified: VerifiedManifest,
    *,
    push_id: str = "",
    forced: bool = False,
    restart: bool | None = None,
    retry: bool = False,
) -> StageResult:
    """Download and verify ``verified`` into updates/<version>, mark it STAGED.

    With ``retry`` a resumable failure (forced_push.RESUMABLE) is raised
    unreported (the caller tries again). Raises :class:`Unreachable`,
    DownloadError, IntegrityError, DiskFullError... (each also reported as
    ``failed`` and recorded).
    """
    cfg, store, reporter = ctx.config, ctx.store, ctx.reporter
    m = verified.manifest
    # An operator's stage push holds the release for their apply (issue 11,
    # item 5): only another push (forced) changes that, never a check.
    held = forced and restart is False
    restart = m.restart if restart is None else restart
    s = store.reload()
    if s.staged is not None and s.staged.version == m.version:
        if s.staged.held and not forced:
            held, restart = True, False
        try:
            await trio.to_thread.run_sync(load_staged_manifest, cfg.state_dir, m.version)
        except UpdaterError:
            pass
        else:
            info = attrs.evolve(
                s.staged,
                push_id=push_id or s.staged.push_id,
                forced=forced or s.staged.forced,
                restart=restart,
                held=held,
            )
            await store.change(lambda st: without_pending(attrs.evolve(st, staged=info), m.version))
            return StageResult(staged=info)
    last = 0.0

    def on_progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done >= total or now - last >= PROGRESS_INTERVAL:
            last = now
            ctx.spawner.start_soon(
                partial(
                    reporter.progress,
                    "downloading",
                    m.version,
                    push_id=push_id,
                    done=done,
                    total=total,
                )
            )

    await reporter.progress("downloading", m.version, push_id=push_id, total=m.total_size)
    try:
        peer = await ctx.link.wait_connected(cfg.check_timeout)
        if ctx.p2p is not None:  # peers first; the download below fetches the rest
            await ctx.p2p.before_download(peer, verified.signed, m)
        result = await download(
            peer,
            verified.signed,
            m,
            ctx.layout,
            cfg.app_root,
            window=cfg.window,
            chunks_per_request=cfg.chunks_per_request,
            io_threads=cfg.io_threads,
            max_rate=cfg.max_download_rate,
            on_progress=on_progress,
        )
        if ctx.p2p is not None:
            await ctx.p2p.after_download(peer, m, result.bytes_fetched)
        log.info(
            "downloaded %s: %d chunks fetched, %d resumed, %d copied locally, %.2fs",
            m.version,
            result.chunks_fetched,
            result.chunks_resumed,
            result.chunks_copied,
            result.elapsed,
        )
        await reporter.progress("verifying", m.version, push_id=push_id)
        await trio.to_thread.run_sync(lambda: mark_staged(cfg.state_dir, m.version, verify=False))
    except FleetpushError as e:
        if not (retry and isinstance(e, RESUMABLE)):
            await reporter.progress("failed", m.version, push_id=push_id, error=str(e))
            await reporter.record("failed", m.version, f"download: {e}", push_id)
        raise
    previous = s.staged.attempts if s.staged and s.staged.version == m.version else 0
    info = StagedInfo(
        version=m.version,
        sequence=m.sequence,
        restart=restart,
        push_id=push_id or None,
        forced=forced,
        attempts=previous,
        held=held,
    )
    # Staged and no longer pending in one atomic write.
    await store.change(lambda st: without_pending(attrs.evolve(st, staged=info), m.version))
    await reporter.progress("staged", m.version, push_id=push_id)
    await reporter.record("staged", m.version, None, push_id)
    return StageResult(staged=info, download=result)
