"""The device's side of freshness and signed commands (specs/PROTOCOL.md §8.6, §7.4).

Only when the trusted root names a ``timestamp`` role; a device on a root
without one (or on bare ``trusted_keys``) behaves as before.

* On connect the hello result's statement, bound to the nonce this device
  put in its hello, is verified (protocol/freshness.py) and kept in the
  device state (``extra["freshness"]``: counter, expiry, promised sequences),
  so the counter check survives restarts.
* :func:`watch` runs beside the session: each heartbeat it asks for a new
  statement (``get_freshness`` with a fresh nonce) once half of the current
  one's life has passed, and when the newest one has expired it reports
  ``stale`` (once per lapse): a releaser, or a man in the middle, that keeps
  serving an old state is seen within the expiry plus one heartbeat.
* :func:`command_refusal` is asked before a push command is accepted: the
  command must carry a statement, for this connection's nonce, naming that
  exact command. Otherwise the device answers ``accepted: false``.
* :func:`promise_refusal` (``freshness_strict``) refuses a release older than
  the newest statement promised.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Final

import attrs
import trio
from fleetpush.protocol.errors import FleetpushError, FreshnessError, RpcError, TrustError
from fleetpush.protocol.freshness import (
    NONCE_SIZE,
    Freshness,
    check_promise,
    command_digest,
    verify_freshness,
)
from fleetpush.protocol.messages import (
    GetFreshness,
    GetFreshnessResult,
    SignedManifest,
    UpdateCommand,
)

from .context import UpdateContext
from .session import Unreachable
from .state import DeviceState

log = logging.getLogger("fleetpush.client.updater")

#: ``DeviceState.extra`` key of the newest accepted statement's facts.
FRESHNESS: Final = "freshness"


def kept(s: DeviceState) -> dict[str, Any]:
    value = s.extra.get(FRESHNESS)
    return value if isinstance(value, dict) else {}


def is_stale(s: DeviceState, now: float) -> bool:
    """True if the newest accepted statement has expired, or none was ever accepted (pure)."""
    return now >= float(kept(s).get("expires", 0))


async def _keep(ctx: UpdateContext, f: Freshness) -> None:
    facts = {
        "counter": f.counter,
        "issued": f.issued,
        "expires": f.expires,
        "sequences": {app: dict(ch) for app, ch in f.sequences.items()},
    }

    def change(s: DeviceState) -> DeviceState:
        if int(kept(s).get("counter", 0)) > f.counter:
            return s  # a newer one was kept meanwhile
        return attrs.evolve(s, extra={**s.extra, FRESHNESS: facts})

    await ctx.store.change(change)


async def _accept(
    ctx: UpdateContext, signed: SignedManifest, nonce: bytes, command: bytes | None = None
) -> Freshness | None:
    """Verify ``signed`` for ``nonce``; keep it. None if the root names no timestamp key.

    Raises BadSignature, UnknownKey, ThresholdNotMet, FreshnessError, StaleFreshness.
    """
    trust = ctx.roots.timestamp_trust()
    if trust is None:
        return None
    last = int(kept(ctx.store.state).get("counter", 0))
    f = verify_freshness(
        trust, signed, nonce=nonce, last_counter=last, now=time.time(), command=command
    )
    await _keep(ctx, f)
    return f


async def accept_hello(ctx: UpdateContext) -> None:
    """Verify and keep the statement of the hello result (on connect). Never raises."""
    hello, nonce = ctx.link.server_hello, ctx.link.hello_nonce
    if ctx.roots.timestamp_trust() is None or hello is None or nonce is None:
        return
    if hello.freshness is None:
        log.warning("the releaser sent no freshness statement (has it a timestamp key?)")
        return
    try:
        await _accept(ctx, hello.freshness, nonce)
    except FreshnessError as e:
        # A push of this connection may have been checked (and its newer counter
        # kept) first: the hello's own statement then looks older. Benign.
        log.info("hello freshness statement not kept: %s", e)
    except FleetpushError as e:
        log.warning("freshness statement refused: %s", e)


async def refresh(ctx: UpdateContext, timeout: float) -> None:
    """Ask for a statement answering a fresh nonce and keep it.

    Raises Unreachable, RpcError, or the errors of :func:`verify_freshness`.
    """
    nonce = os.urandom(NONCE_SIZE)
    result = await ctx.link.request("get_freshness", GetFreshness(nonce=nonce), timeout)
    assert isinstance(result, GetFreshnessResult)
    await _accept(ctx, result.freshness, nonce)


async def command_refusal(ctx: UpdateContext, method: str, cmd: UpdateCommand) -> str | None:
    """Why a push command is refused (§7.4, §8.6), or None to go on."""
    if ctx.roots.timestamp_trust() is None:
        return None
    if cmd.freshness is None:
        return "the command carries no freshness statement, and this device's root requires one"
    nonce = ctx.link.hello_nonce
    if nonce is None:
        return "no connection nonce to check the command's freshness statement against"
    plain = attrs.evolve(cmd, freshness=None)
    try:
        await _accept(ctx, cmd.freshness, nonce, command_digest(method, plain))
    except TrustError as e:
        return f"command refused: {e}"
    return None


def promise_refusal(ctx: UpdateContext, sequence: int) -> TrustError | None:
    """With ``freshness_strict``: the error refusing ``sequence`` as older than promised."""
    if not ctx.config.freshness_strict or ctx.roots.timestamp_trust() is None:
        return None
    facts = kept(ctx.store.state)
    f = Freshness(
        server_id="",
        counter=int(facts.get("counter", 0)),
        issued=0,
        expires=0,
        nonce=bytes(NONCE_SIZE),
        sequences=facts.get("sequences", {}),
    )
    try:
        check_promise(f, app=ctx.config.app, channel=ctx.config.channel, sequence=sequence)
    except TrustError as e:
        return e
    return None


async def watch(ctx: UpdateContext) -> None:
    """Each heartbeat: keep a statement current, and report ``stale`` when it lapsed. Forever."""
    reported = False
    while True:
        await trio.sleep(ctx.config.heartbeat)
        if ctx.roots.timestamp_trust() is None:
            continue
        now = time.time()
        facts = kept(ctx.store.state)
        issued, expires = float(facts.get("issued", 0)), float(facts.get("expires", 0))
        if ctx.link.connected and now >= issued + (expires - issued) / 2:
            try:
                await refresh(ctx, ctx.config.check_timeout)
            except (Unreachable, RpcError, FleetpushError) as e:
                log.info("no fresh freshness statement: %s", e)
        if is_stale(ctx.store.state, time.time()):
            if not reported:
                reported = True
                log.warning("freshness statement expired: updates may be withheld")
                hello = ctx.link.server_hello
                # "stale" is a progress state only releasers that serve roots know
                # (an older one would close the connection on it, §7.6).
                if hello is not None and hello.root_version is not None:
                    await ctx.reporter.progress(
                        "stale", error="no fresh signed statement from the releaser"
                    )
        elif reported:
            reported = False
            await ctx.reporter.progress("idle")


__all__ = [
    "FRESHNESS",
    "accept_hello",
    "command_refusal",
    "is_stale",
    "promise_refusal",
    "refresh",
    "watch",
]
