"""Staging an update: download and verify a trusted release into updates/<version>.

The download is chunk-verified and resumable (download.py); once every file
is in place it is marked STAGED (staging.py) and recorded in the device
state, in the same atomic write that drops a pending forced push of that
version (forced_push.py). A release already staged is not downloaded again.
Every failure is reported as ``failed`` and recorded in the history, except a
resumable one of a forced update that will be retried.

:class:`UpdateStager` is a part of :class:`~fleetpush.client.updater.Updater`
(which creates one and offers ``stage``); it is not used alone.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.trust import VerifiedManifest

from .download import download
from .errors import UpdaterError
from .forced_push import RESUMABLE, without_pending
from .staging import load_staged_manifest, mark_staged
from .state import StagedInfo

if TYPE_CHECKING:
    from .updater import Updater

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")

#: Progress notifications while downloading are sent at most this often.
PROGRESS_INTERVAL: Final = 0.25


class UpdateStager:
    """The download-and-stage step of one :class:`Updater`."""

    def __init__(self, updater: Updater) -> None:
        self._updater = updater

    async def stage(
        self,
        verified: VerifiedManifest,
        *,
        push_id: str = "",
        forced: bool = False,
        restart: bool | None = None,
        retry: bool = False,
    ) -> StagedInfo:
        """:meth:`Updater.stage`; with ``retry`` a resumable failure is raised unreported."""
        u = self._updater
        m = verified.manifest
        restart = m.restart if restart is None else restart
        s = u.reload_state()
        if s.staged is not None and s.staged.version == m.version:
            try:
                await trio.to_thread.run_sync(load_staged_manifest, u.config.state_dir, m.version)
            except UpdaterError:
                pass
            else:
                info = attrs.evolve(
                    s.staged,
                    push_id=push_id or s.staged.push_id,
                    forced=forced or s.staged.forced,
                    restart=restart,
                )
                await u._change_state(
                    lambda st: without_pending(attrs.evolve(st, staged=info), m.version)
                )
                return info
        last = 0.0

        def on_progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done >= total or now - last >= PROGRESS_INTERVAL:
                last = now
                if u._nursery is not None:
                    u._nursery.start_soon(
                        lambda: u.progress(
                            "downloading", m.version, push_id=push_id, done=done, total=total
                        )
                    )

        await u.progress("downloading", m.version, push_id=push_id, total=m.total_size)
        try:
            peer = await u.session.wait_connected(u.config.check_timeout)
            result = await download(
                peer,
                verified.signed,
                m,
                u.layout,
                u.config.app_root,
                window=u.config.window,
                chunks_per_request=u.config.chunks_per_request,
                io_threads=u.config.io_threads,
                max_rate=u.config.max_download_rate,
                on_progress=on_progress,
            )
            u.last_download = result
            log.info(
                "downloaded %s: %d chunks fetched, %d resumed, %d copied locally, %.2fs",
                m.version,
                result.chunks_fetched,
                result.chunks_resumed,
                result.chunks_copied,
                result.elapsed,
            )
            await u.progress("verifying", m.version, push_id=push_id)
            await trio.to_thread.run_sync(
                lambda: mark_staged(u.config.state_dir, m.version, verify=False)
            )
        except FleetpushError as e:
            u.last_error = str(e)
            if not (retry and isinstance(e, RESUMABLE)):
                await u.progress("failed", m.version, push_id=push_id, error=str(e))
                await u.record("failed", m.version, f"download: {e}", push_id)
            raise
        previous = s.staged.attempts if s.staged and s.staged.version == m.version else 0
        info = StagedInfo(
            version=m.version,
            sequence=m.sequence,
            restart=restart,
            push_id=push_id or None,
            forced=forced,
            attempts=previous,
        )
        # Staged and no longer pending in one atomic write.
        await u._change_state(lambda st: without_pending(attrs.evolve(st, staged=info), m.version))
        await u.progress("staged", m.version, push_id=push_id)
        await u.record("staged", m.version, None, push_id)
        return info
