"""Checking for an update: ask the releaser, apply the trust rules, judge the offer.

Nothing is written before the manifest passes the trust rules
(specs/PROTOCOL.md §8.2), and the raised sequence high-water mark is
persisted atomically right after (state.py), so an older manifest is refused
after a restart too. :class:`UpdateInfo` says what was found and, if the
offered version is not available, why (installed, failed here before, not
newer).

The steps take the :class:`~fleetpush.client.context.UpdateContext`;
:func:`judge` is a pure decision over the device state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs
from fleetpush.protocol.errors import (
    ErrorCode,
    RpcError,
    ThresholdNotMet,
    TrustError,
    UnknownKey,
)
from fleetpush.protocol.messages import (
    CheckUpdate,
    CheckUpdateResult,
    GetManifest,
    GetManifestResult,
    GetRoot,
    GetRootResult,
    SignedManifest,
)
from fleetpush.protocol.root import LEGACY_VERSION, Root, sequence_reset
from fleetpush.protocol.trust import VerifiedManifest, verify_manifest

from . import freshness
from .context import UpdateContext
from .session import Unreachable
from .state import DeviceState

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


async def refresh_roots(ctx: UpdateContext, *, probe: bool = False) -> int:
    """Walk to the newest root the releaser serves (specs/PROTOCOL.md §8.5); how many were new.

    Without ``probe`` only when the hello result announced a root newer than
    the trusted one; with it, ask for the next version anyway (a manifest was
    signed by keys this device does not trust yet). Raises the §8.4 errors,
    :class:`Unreachable`, :class:`RpcError`, or what saving state raises.
    """
    # The hello result of the connection the walk will use (§5.1).
    await ctx.link.wait_connected(ctx.config.check_timeout)
    hello = ctx.link.server_hello
    announced = hello.root_version if hello is not None else None
    if not probe and (announced is None or announced <= ctx.roots.version):
        return 0

    async def fetch(version: int) -> SignedManifest | None:
        try:
            result = await ctx.link.request(
                "get_root", GetRoot(version=version), ctx.config.check_timeout
            )
        except RpcError as e:
            if e.code in (ErrorCode.NOT_FOUND, ErrorCode.METHOD_NOT_FOUND):
                return None  # none newer (or an older releaser that serves no roots)
            raise
        assert isinstance(result, GetRootResult)
        return result.root

    async def on_reset(root: Root) -> None:
        app = ctx.config.app

        def reset(s: DeviceState) -> DeviceState:
            value = sequence_reset(root, app, s.high_water)
            if value is None:
                return s
            log.warning(
                "root version %d lowers the sequence high-water mark of %s from %d to %d",
                root.version,
                app,
                s.high_water,
                value,
            )
            return s.reset_high_water(value, root.version)

        await ctx.store.change(reset)

    try:
        return await ctx.roots.walk(fetch, on_reset, target=None if probe else announced)
    except TrustError as e:
        if ctx.roots.version != LEGACY_VERSION:
            raise
        # Bare trusted_keys (root v0) migrate only to a root their keys co-signed
        # (§8.5); one they did not sign leaves them on their keys, as before roots.
        log.warning("staying on trusted_keys: %s", e)
        return 0


def _verify(ctx: UpdateContext, signed: SignedManifest) -> VerifiedManifest:
    s = ctx.store.reload()
    now = time.time()
    return verify_manifest(
        ctx.roots.release_trust(now),
        signed,
        app=ctx.config.app,
        high_water=s.high_water,
        now=now,
        installed_version=s.installed_version,
    )


async def trust_manifest(ctx: UpdateContext, signed: SignedManifest) -> VerifiedManifest:
    """Root walk, trust rules, then persist the raised high-water mark before anything else.

    The verification order is root -> freshness -> manifest (specs/PROTOCOL.md
    §8.7): a release signed under a newer root is trusted only after the
    device walked to that root. Raises :class:`TrustError` (nothing is
    written then), or what saving the state raises.
    """
    await refresh_roots(ctx)
    try:
        verified = _verify(ctx, signed)
    except (UnknownKey, ThresholdNotMet):
        # Signed by keys of a root this device has not seen (it connected
        # before the root was published): look for one, then judge again.
        if await refresh_roots(ctx, probe=True) == 0:
            raise
        verified = _verify(ctx, signed)
    refused = freshness.promise_refusal(ctx, verified.manifest.sequence)
    if refused is not None:  # freshness_strict (§8.6)
        raise refused
    if verified.advances:
        seq = verified.manifest.sequence
        await ctx.store.change(lambda s: s.raise_high_water(seq))
    return verified


async def check(
    ctx: UpdateContext,
    *,
    timeout: float,
    on_update_available: Callable[[UpdateInfo], object] | None = None,
) -> UpdateInfo:
    """Ask the releaser what is newest for this device; verify it; download nothing.

    Raises :class:`Unreachable` (within ``timeout``), :class:`RpcError`, or a
    :class:`TrustError` if the offered manifest is refused (each reported as
    failed too).
    """
    reporter = ctx.reporter
    await reporter.progress("checking")
    try:
        # A newer root first (§8.7): it may lower the sequence asked with (§8.5).
        await refresh_roots(ctx)
    except TrustError as e:
        await reporter.progress("failed", error=f"root refused: {e}", check=True)
        raise
    except (Unreachable, RpcError) as e:
        await reporter.progress("failed", error=f"check: {e}", check=True)
        raise
    s = ctx.store.reload()
    params = CheckUpdate(
        app=ctx.config.app,
        version=s.installed_version or "0",
        channel=ctx.config.channel,
        sequence=s.installed_sequence,
    )
    try:
        result = await ctx.link.request("check_update", params, timeout)
    except (Unreachable, RpcError) as e:
        await reporter.progress("failed", error=f"check: {e}", check=True)
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
            verified = await trust_manifest(ctx, result.manifest)
        except TrustError as e:
            await reporter.progress("failed", result.version or "", error=f"refused: {e}")
            await reporter.record("failed", result.version, f"manifest refused: {e}")
            raise
        info = held_back(
            ctx.store.state,
            judge(ctx.store.state, attrs.evolve(info, offered=verified.manifest.version), verified),
        )
    else:
        info = attrs.evolve(info, reason="up to date")
    held = ctx.store.state.staged
    if info.available:
        await reporter.progress("idle", info.offered or "")
    elif held is not None and held.held:  # still waiting for the operator's apply
        await reporter.progress("staged", held.version)
    else:
        await reporter.progress("up_to_date", info.offered or "")
    if info.available and on_update_available is not None:
        try:
            on_update_available(info)
        except Exception:
            log.exception("on_update_available hook failed")
    return info


def judge(s: DeviceState, info: UpdateInfo, verified: VerifiedManifest) -> UpdateInfo:
    """``info`` with whether ``verified`` is available on a device in state ``s``,
    and if not, why (pure)."""
    m = verified.manifest
    if m.version == s.installed_version:
        # The same version is the same release, whatever sequence the device
        # knew it by (a fresh device starts at 0): never an update (issue 11, item 6).
        return attrs.evolve(info, reason="installed", verified=verified)
    if s.is_bad(m.version):
        return attrs.evolve(
            info, reason="failed on this device before (push it to retry)", verified=verified
        )
    if not verified.advances and m.sequence <= s.installed_sequence:
        return attrs.evolve(info, reason="not newer than the installed release", verified=verified)
    return attrs.evolve(info, available=True, verified=verified)


def held_back(s: DeviceState, info: UpdateInfo) -> UpdateInfo:
    """``info``, not available while an operator holds a staged release (pure).

    A release staged by ``push --stage`` waits for ``fleetpush apply``; a
    check (periodic, or ``fleetpush update`` without ``--to``) must not apply
    it, nor replace it with a newer one behind the operator's back (issue 11,
    item 5). A push or ``apply`` (specs/PROTOCOL.md §7.4) does not check.
    """
    staged = s.staged
    if not info.available or staged is None or not staged.held:
        return info
    return attrs.evolve(
        info,
        available=False,
        reason=f"{staged.version} is staged and held for an operator's apply "
        f"(fleetpush apply on the console)",
    )


async def manifest_for(ctx: UpdateContext, version: str, timeout: float) -> VerifiedManifest:
    """Fetch ``version``'s manifest and apply the trust rules (:func:`trust_manifest`).

    Raises :class:`Unreachable`, :class:`RpcError` or :class:`TrustError`.
    """
    result = await ctx.link.request(
        "get_manifest", GetManifest(app=ctx.config.app, version=version), timeout
    )
    assert isinstance(result, GetManifestResult)
    return await trust_manifest(ctx, result.manifest)
