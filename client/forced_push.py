"""Forced (pushed) updates that survive failures: persisted, retried, resumed.

A push from the releaser (specs/PROTOCOL.md §7.4) is persisted in
``DeviceState.extra[PENDING_PUSH]`` before it is acknowledged, so neither a
kill nor a lost connection loses it:

* a resumable download failure (:data:`RESUMABLE`) is retried with backoff up
  to ``max_download_attempts``, counted across restarts (an attempt is
  counted before it starts, so a kill counts too);
* after a restart or a reconnect the pending push is resumed once connected.

The downloader resumes: staged chunks are re-verified, only missing ones are
fetched. The pending record goes away when the release is staged (in the same
atomic write), already installed, refused, or out of attempts.

:class:`ForcedPushes` is given the :class:`~fleetpush.client.context.UpdateContext`
and, as callables, the two steps it repeats: staging and the whole update.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, Final, Protocol

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.trust import VerifiedManifest

from .commands import PENDING_PUSH
from .context import UpdateContext
from .download import DownloadError
from .session import Unreachable, backoff_delay
from .state import DeviceState, StagedInfo

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")

#: ``DeviceState.extra`` key (:data:`PENDING_PUSH`, defined in commands.py) of
#: a forced (pushed) update not staged yet:
#: ``{"version", "push_id", "restart", "forced", "attempts"}``. It is written
#: before the push is acknowledged and survives a kill, so the download is
#: resumed after a restart, once connected (issue 10, item 10).

#: Download failures worth another attempt of a forced update (the downloader
#: resumes: staged chunks are re-verified, only missing ones fetched). Not
#: IntegrityError/TrustError (a bad release) nor DiskFullError (needs a human).
RESUMABLE: Final = (DownloadError, Unreachable)


def pending_push(s: DeviceState) -> dict[str, Any] | None:
    """The persisted forced update still to be downloaded, if any."""
    p = s.extra.get(PENDING_PUSH)
    if isinstance(p, dict) and isinstance(p.get("version"), str):
        return p
    return None


def with_pending(s: DeviceState, pending: dict[str, Any] | None) -> DeviceState:
    """``s`` with ``pending`` as its pending push (None: without one)."""
    extra = {k: v for k, v in s.extra.items() if k != PENDING_PUSH}
    if pending is not None:
        extra[PENDING_PUSH] = pending
    return attrs.evolve(s, extra=extra)


def without_pending(s: DeviceState, version: str) -> DeviceState:
    """``s`` without its pending push if that is of ``version``."""
    p = pending_push(s)
    return with_pending(s, None) if p is not None and p["version"] == version else s


class StageFn(Protocol):
    """Stage a trusted release (the updater's stage step); raises what it raises."""

    async def __call__(
        self,
        verified: VerifiedManifest,
        *,
        push_id: str,
        forced: bool,
        restart: bool | None,
        retry: bool,
    ) -> StagedInfo: ...


class UpdateFn(Protocol):
    """The whole forced update of ``version`` (the updater's ``update``)."""

    async def __call__(
        self,
        version: str | None = None,
        *,
        push_id: str = "",
        forced: bool = False,
        restart: bool | None = None,
        timeout: float | None = None,
    ) -> object: ...


class ForcedPushes:
    """The pending forced update of one device: persist, retry, resume."""

    def __init__(
        self,
        ctx: UpdateContext,
        *,
        stage: StageFn,
        update: UpdateFn,
        on_error: Callable[[str], None],
    ) -> None:
        self._ctx = ctx
        self._stage = stage
        self._update = update
        self._on_error = on_error
        #: run() has started up: pending pushes may be resumed on connect.
        self.resume_enabled = False
        self._resuming = False
        self._rng = random.Random()

    async def remember(
        self, version: str, push_id: str, restart: bool | None, forced: bool
    ) -> None:
        """Persist a forced update before anything else; a resumed one keeps its attempts."""

        def change(s: DeviceState) -> DeviceState:
            old = pending_push(s)
            same = old is not None and (old["version"], old.get("push_id")) == (version, push_id)
            attempts = int(old.get("attempts", 0)) if same and old is not None else 0
            pending = {
                "version": version,
                "push_id": push_id,
                "restart": restart,
                "forced": forced,
                "attempts": attempts,
            }
            return with_pending(s, pending)

        await self._ctx.store.change(change)

    async def forget(self, version: str) -> None:
        """Drop the pending push if it is of ``version``."""
        store = self._ctx.store
        if pending_push(store.reload()) is not None:
            await store.change(lambda s: without_pending(s, version))

    async def count_attempt(self, version: str) -> int:
        """Persist one more download attempt (before it starts: a kill counts too)."""

        def change(s: DeviceState) -> DeviceState:
            p = pending_push(s)
            if p is None or p["version"] != version:
                return s
            return with_pending(s, {**p, "attempts": int(p.get("attempts", 0)) + 1})

        p = pending_push(await self._ctx.store.change(change))
        return int(p["attempts"]) if p is not None and p["version"] == version else 1

    async def stage_retrying(
        self, verified: VerifiedManifest, *, push_id: str, restart: bool | None
    ) -> StagedInfo:
        """Stage a forced update, retrying resumable failures with backoff up to
        ``max_download_attempts`` (counted across restarts). The last failure
        is reported as ``failed``; raises what the stage step raises.
        """
        cfg = self._ctx.config
        m = verified.manifest
        limit = cfg.max_download_attempts
        while True:
            attempt = await self.count_attempt(m.version)
            try:
                return await self._stage(
                    verified, push_id=push_id, forced=True, restart=restart, retry=attempt < limit
                )
            except RESUMABLE as e:
                if attempt >= limit:
                    await self.forget(m.version)
                    raise
                delay = backoff_delay(attempt, cfg.backoff_initial, cfg.backoff_max, self._rng)
                log.warning(
                    "download of %s, attempt %d/%d: %s; retrying in %.1fs",
                    m.version,
                    attempt,
                    limit,
                    e,
                    delay,
                )
                await self._ctx.reporter.progress(
                    "downloading",
                    m.version,
                    push_id=push_id,
                    error=f"attempt {attempt}/{limit}: {e}; retrying in {delay:.1f}s",
                )
                await trio.sleep(delay)
            except FleetpushError:
                await self.forget(m.version)  # a bad release or a full disk: stop
                raise

    def maybe_resume(self) -> None:
        """Start resuming the pending push, if there is one and none is resuming."""
        ctx = self._ctx
        if not self.resume_enabled or self._resuming or not ctx.spawner.running:
            return
        if pending_push(ctx.store.reload()) is not None:
            self._resuming = ctx.spawner.start_soon(self._resume)

    async def _resume(self) -> None:
        """Continue a persisted forced update (after a restart or a lost connection)."""
        ctx = self._ctx
        try:
            while ctx.store.op_lock.locked():  # e.g. the retry loop of the same push
                await trio.sleep(0.2)
            p = pending_push(ctx.store.reload())
            if p is None:
                return
            version, push_id = p["version"], str(p.get("push_id") or "")
            if int(p.get("attempts", 0)) >= ctx.config.max_download_attempts:
                error = f"gave up after {p.get('attempts')} download attempts"
                await self.forget(version)
                await ctx.reporter.progress("failed", version, push_id=push_id, error=error)
                await ctx.reporter.record("failed", version, f"download: {error}", push_id)
                return
            log.info("resuming the pushed update to %s", version)
            restart = p.get("restart")
            await self._update(
                version,
                push_id=push_id,
                forced=True,
                restart=restart if isinstance(restart, bool) else None,
                timeout=max(ctx.config.check_timeout, 10.0),
            )
        except FleetpushError as e:
            log.warning("resuming the pushed update: %s", e)
            self._on_error(str(e))
        finally:
            self._resuming = False
