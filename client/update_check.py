"""Checking for an update: ask the releaser, apply the trust rules, judge the offer.

Nothing is written before the manifest passes the trust rules
(specs/PROTOCOL.md §8.2), and the raised sequence high-water mark is
persisted atomically right after (state.py), so an older manifest is refused
after a restart too. :class:`UpdateInfo` says what was found and, if the
offered version is not available, why (installed, failed here before, not
newer).

:class:`UpdateChecker` is a part of :class:`~fleetpush.client.updater.Updater`
(which creates one and offers ``check``); it is not used alone.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import attrs
from fleetpush.protocol.errors import RpcError, TrustError
from fleetpush.protocol.messages import (
    CheckUpdate,
    CheckUpdateResult,
    GetManifest,
    GetManifestResult,
    SignedManifest,
)
from fleetpush.protocol.trust import VerifiedManifest, verify_manifest

from .session import Unreachable

if TYPE_CHECKING:
    from .updater import Updater

# The updater's modules share one logger, so its log lines read as before the split.
log = logging.getLogger("fleetpush.client.updater")


@attrs.frozen(kw_only=True)
class UpdateInfo:
    """What :meth:`Updater.check` found."""

    installed: str | None
    offered: str | None = None
    sequence: int | None = None
    status: str | None = None
    available: bool = False
    #: why an offered version is not available (bad release, already staged...).
    reason: str = ""
    verified: VerifiedManifest | None = attrs.field(default=None, eq=False, repr=False)


class UpdateChecker:
    """The check step of one :class:`Updater`."""

    def __init__(self, updater: Updater) -> None:
        self._updater = updater

    def _verify(self, signed: SignedManifest) -> VerifiedManifest:
        u = self._updater
        s = u.state
        return verify_manifest(
            u.trust,
            signed,
            app=u.config.app,
            high_water=s.high_water,
            now=time.time(),
            installed_version=s.installed_version,
        )

    async def trust_manifest(self, signed: SignedManifest) -> VerifiedManifest:
        """Trust rules, then persist the raised high-water mark before anything else."""
        u = self._updater
        u.reload_state()
        verified = self._verify(signed)
        if verified.advances:
            seq = verified.manifest.sequence
            await u._change_state(lambda s: s.raise_high_water(seq))
        return verified

    async def check(self, *, timeout: float | None = None) -> UpdateInfo:
        """See :meth:`Updater.check`."""
        u = self._updater
        timeout = u.config.check_timeout if timeout is None else timeout
        await u.progress("checking")
        s = u.reload_state()
        params = CheckUpdate(
            app=u.config.app,
            version=s.installed_version or "0",
            channel=u.config.channel,
            sequence=s.installed_sequence,
        )
        try:
            result = await u.session.request("check_update", params, timeout)
        except (Unreachable, RpcError) as e:
            await u.progress("failed", error=f"check: {e}")
            raise
        assert isinstance(result, CheckUpdateResult)
        info = UpdateInfo(
            installed=s.installed_version,
            offered=result.version,
            sequence=result.sequence,
            status=result.status,
        )
        if result.available and result.manifest is not None:
            try:
                verified = await self.trust_manifest(result.manifest)
            except TrustError as e:
                await u.progress("failed", result.version or "", error=f"refused: {e}")
                await u.record("failed", result.version, f"manifest refused: {e}")
                raise
            info = self.judge(attrs.evolve(info, offered=verified.manifest.version), verified)
        else:
            info = attrs.evolve(info, reason="up to date")
        u.last_info = info
        await u.progress("idle" if info.available else "up_to_date", info.offered or "")
        if info.available and u.on_update_available is not None:
            try:
                u.on_update_available(info)
            except Exception:
                log.exception("on_update_available hook failed")
        return info

    def judge(self, info: UpdateInfo, verified: VerifiedManifest) -> UpdateInfo:
        """``info`` with whether ``verified`` is available here, and if not, why."""
        m, s = verified.manifest, self._updater.state
        if m.version == s.installed_version and m.sequence == s.installed_sequence:
            return attrs.evolve(info, reason="installed", verified=verified)
        if s.is_bad(m.version):
            return attrs.evolve(
                info, reason="failed on this device before (push it to retry)", verified=verified
            )
        if not verified.advances and m.sequence <= s.installed_sequence:
            return attrs.evolve(
                info, reason="not newer than the installed release", verified=verified
            )
        return attrs.evolve(info, available=True, verified=verified)

    async def manifest_for(self, version: str, timeout: float) -> VerifiedManifest:
        """Fetch ``version``'s manifest and apply the trust rules (:meth:`trust_manifest`)."""
        u = self._updater
        result = await u.session.request(
            "get_manifest", GetManifest(app=u.config.app, version=version), timeout
        )
        assert isinstance(result, GetManifestResult)
        return await self.trust_manifest(result.manifest)
