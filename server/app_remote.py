"""Remote app control and logs: an operator reaches a device's supervised app (§7.7; issue 13).

``app_control`` asks each named device, over its live connection, to start,
stop or restart its app (``__app_control__``) and answers with one outcome
per device: the app's new status, or why not (not connected, no supervisor,
the app failed). Every request is audited as an ``app_control`` event with
the operator's name.

``app_logs`` asks one device for its app's last lines (``__app_logs__``);
with ``follow`` the device then sends ``app_log`` notifications, which
:class:`LogRelay` hands to every operator following that device, each
through a bounded queue (a slow operator loses lines, counted, never the
releaser's memory). Lines from a device nobody follows are dropped on
arrival. When the last follower of a device leaves (Ctrl-C closes its
connection), the device is told to stop; when the device goes, each
follower receives a last event saying so and its stream ends.
"""

from __future__ import annotations

import contextlib
import time
from typing import Final

import trio
from fleetpush.protocol import ErrorCode, FleetpushError, RpcError
from fleetpush.protocol.messages import (
    AppCommand,
    AppControl,
    AppControlOutcome,
    AppControlResult,
    AppLogLines,
    AppLogs,
    AppStatus,
    Event,
)

from fleetpush.net.peer import PeerClosed

from .call import Call
from .errors import Unavailable
from .fleet import DeviceLink
from .log_relay import Follower, LogRelay
from .services import Services

#: How long a device may take to answer (a stop waits up to its stop_timeout).
DEVICE_TIMEOUT: Final = 60.0
#: Devices asked at once by one app_control.
CONCURRENCY: Final = 32


def _describe(e: BaseException) -> str:
    if isinstance(e, RpcError):
        return e.message
    if isinstance(e, trio.TooSlowError):
        return f"the device did not answer within {DEVICE_TIMEOUT:g}s"
    if isinstance(e, PeerClosed):
        return "the device disconnected"
    return str(e)


async def app_control(services: Services, call: Call, p: AppControl) -> None:
    """Start, stop or restart the apps of ``p.devices`` and ``p.group``'s devices."""
    targets = list(dict.fromkeys(p.devices))
    if p.group is not None:
        targets += [
            row["device_id"]
            for row in services.devices.list(group=p.group)
            if row["device_id"] not in targets
        ]
    outcomes: dict[str, AppControlOutcome] = {}
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def ask(device_id: str, live: DeviceLink) -> None:
        async with limiter:
            try:
                status = await live.request(
                    "__app_control__", AppCommand(action=p.action), DEVICE_TIMEOUT
                )
            except (FleetpushError, trio.TooSlowError, PeerClosed) as e:
                outcomes[device_id] = AppControlOutcome(
                    device_id=device_id, ok=False, error=_describe(e)
                )
            else:
                assert isinstance(status, AppStatus)
                ok = status.state != "error"
                outcomes[device_id] = AppControlOutcome(
                    device_id=device_id, ok=ok, status=status, error=None if ok else status.error
                )

    async with trio.open_nursery() as nursery:
        for device_id in targets:
            live = services.fleet.get(device_id)
            if live is None or not live.can_take_commands:
                known = services.devices.get(device_id) is not None
                # Several releasers: the link may be on another one (not
                # forwarded, see specs/SCALE.md), so name it.
                outcomes[device_id] = AppControlOutcome(
                    device_id=device_id,
                    ok=False,
                    error=_elsewhere(services, device_id) if known else "no such device",
                )
                continue
            nursery.start_soon(ask, device_id, live)
    results = [outcomes[d] for d in targets]
    for r in results:
        services.events.emit(
            "app_control",
            r.device_id,
            {"action": p.action, "operator": call.operator, "ok": r.ok, "error": r.error},
        )
    call.log.info(
        "app %s on %d device(s) by %s: %d ok",
        p.action, len(results), call.operator, sum(r.ok for r in results),
    )
    await call.respond(AppControlResult(results=results))


def _elsewhere(services: Services, device_id: str) -> str:
    """Why a known device cannot be asked here: not connected, or live on
    another releaser of the fleet (its lease, leases.py: issue 15), which can."""
    if device_id in services.fleet:  # here, but pending: as before
        return "not connected"
    holder = services.leases.holders([device_id], time.time()).get(device_id)
    if holder is None:
        return "not connected"
    return f"connected to releaser {holder}, not this one [ask it there: --server {holder}]"


async def app_logs(services: Services, call: Call, p: AppLogs) -> None:
    """The device's last ``p.lines`` lines; with ``p.follow``, then its new ones as events.

    Raises :class:`Unavailable` (not connected), RpcError (the device's refusal).
    """
    live = services.fleet.get(p.device_id)
    if live is None or not live.can_take_commands:
        if services.devices.get(p.device_id) is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"no device {p.device_id!r}")
        raise Unavailable(f"device {p.device_id}: {_elsewhere(services, p.device_id)}")
    relay = services.app_logs
    if not p.follow:
        tail = await _ask_logs(live, AppLogs(lines=p.lines))
        await call.respond(_tagged(tail, p.device_id))
        return
    # Registered before the device is asked, so no line falls in between.
    follower = relay.add(p.device_id)
    try:
        tail = await _ask_logs(live, AppLogs(lines=p.lines, follow=True))
        await call.respond(_tagged(tail, p.device_id))
    except BaseException:
        _unfollow(relay, live, p.device_id, follower)
        raise
    # Like watch: the answer is sent, the stream runs as the connection's task.
    call.spawn(_pump, call, relay, live, p.device_id, follower)


def _unfollow(relay: LogRelay, live: DeviceLink, device_id: str, follower: Follower) -> None:
    if relay.remove(device_id, follower):
        live.spawn(_stop_following, live)  # the last follower left: the device stops sending


async def _ask_logs(live: DeviceLink, params: AppLogs) -> AppLogLines:
    try:
        answer = await live.request("__app_logs__", params, DEVICE_TIMEOUT)
    except RpcError as e:
        raise RpcError(e.code, e.message) from e
    except (trio.TooSlowError, PeerClosed) as e:
        raise Unavailable(_describe(e)) from e
    assert isinstance(answer, AppLogLines)
    return answer


async def _stop_following(live: DeviceLink) -> None:
    with contextlib.suppress(FleetpushError, trio.TooSlowError, PeerClosed):
        await live.request("__app_logs__", AppLogs(lines=0, follow=False), DEVICE_TIMEOUT)


def _tagged(batch: AppLogLines, device_id: str) -> AppLogLines:
    return AppLogLines(lines=batch.lines, dropped=batch.dropped, device_id=device_id)


async def _pump(
    call: Call, relay: LogRelay, live: DeviceLink, device_id: str, follower: Follower
) -> None:
    """Relay the device's batches to the operator as ``event``s of kind ``app_log``."""
    try:
        async for batch in follower.receive:
            dropped, follower.dropped = batch.dropped + follower.dropped, 0
            data = {"lines": batch.lines, "dropped": dropped}
            await call.notify(
                "event", Event(seq=0, time=time.time(), kind="app_log", device_id=device_id,
                               data=data),
            )
        await call.notify(
            "event",
            Event(seq=0, time=time.time(), kind="app_log_end", device_id=device_id,
                  data={"reason": "the device disconnected"}),
        )
    except PeerClosed:
        pass
    finally:
        _unfollow(relay, live, device_id, follower)


def app_log(services: Services, call: Call, p: AppLogLines) -> None:
    """A device's ``app_log`` notification: to its followers (dropped if none)."""
    services.app_logs.deliver(call.device_id, p)
