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

Several releasers on one PostgreSQL (issue 15): a device live on another
releaser is asked through it (cluster_calls.py: a request row, its id on the
bus, the answer row back), which runs :func:`control_here` or the tail of
``app_logs`` and audits under the original operator's name. ``follow`` is
not forwarded: it is refused naming the releaser to follow it on
(specs/SCALE.md §5).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Final

import attrs
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

from . import cluster_calls, db
from .call import Call
from .cluster_calls import ForwardedCalls
from .errors import Unavailable
from .fleet import DeviceLink
from .log_relay import Follower, LogRelay
from .services import Services

log = logging.getLogger("fleetpush.server")

#: How long a device may take to answer (a stop waits up to its stop_timeout).
DEVICE_TIMEOUT: Final = 60.0
#: Devices asked at once by one app_control.
CONCURRENCY: Final = 32
#: How long a releaser waits for another to answer a forwarded call
#: (cluster_calls.py): under the console's own timeouts (operator.py:
#: APP_CONTROL_TIMEOUT 75 s, DEFAULT_TIMEOUT 10 s), so the operator reads why.
FORWARD_CONTROL_TIMEOUT: Final = 65.0
FORWARD_LOGS_TIMEOUT: Final = 8.0


def _describe(e: BaseException) -> str:
    if isinstance(e, RpcError):
        return e.message
    if isinstance(e, trio.TooSlowError):
        return f"the device did not answer within {DEVICE_TIMEOUT:g}s"
    if isinstance(e, PeerClosed):
        return "the device disconnected"
    return str(e)


async def app_control(services: Services, call: Call, p: AppControl) -> None:
    """Start, stop or restart the apps of ``p.devices`` and ``p.group``'s devices.

    Devices live on another releaser of the fleet (several on one PostgreSQL)
    are asked through it (cluster_calls.py), which audits them itself.
    """
    targets = list(dict.fromkeys(p.devices))
    if p.group is not None:
        targets += [
            row["device_id"]
            for row in services.devices.list(group=p.group)
            if row["device_id"] not in targets
        ]
    operator = call.operator or ""
    here, away = _split_by_holder(services, targets)
    outcomes: dict[str, AppControlOutcome] = {}
    async with trio.open_nursery() as nursery:
        for (releaser_id, address), devices in away.items():
            nursery.start_soon(
                functools.partial(
                    _forward_control,
                    services,
                    operator,
                    p.action,
                    holder=(releaser_id, address),
                    devices=devices,
                    outcomes=outcomes,
                )
            )
        outcomes.update(
            {r.device_id: r for r in await control_here(services, operator, p.action, here)}
        )
    results = [outcomes[d] for d in targets]
    call.log.info(
        "app %s on %d device(s) by %s: %d ok (%d through other releasers)",
        p.action,
        len(results),
        call.operator,
        sum(r.ok for r in results),
        sum(len(d) for d in away.values()),
    )
    await call.respond(AppControlResult(results=results))


async def control_here(
    services: Services, operator: str, action: str, targets: list[str]
) -> list[AppControlOutcome]:
    """Ask the devices live on this releaser; audit each as an ``app_control`` event.

    The local half of :func:`app_control`, and what a forwarded call runs.
    """
    outcomes: dict[str, AppControlOutcome] = {}
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def ask(device_id: str, live: DeviceLink) -> None:
        async with limiter:
            try:
                status = await live.request(
                    "__app_control__", AppCommand(action=action), DEVICE_TIMEOUT
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
            {"action": action, "operator": operator, "ok": r.ok, "error": r.error},
        )
    return results


def _split_by_holder(
    services: Services, targets: list[str]
) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    """The targets asked here, and those live on another releaser, by (its id, address)."""
    calls = _calls(services)
    away: dict[tuple[str, str], list[str]] = {}
    if calls is None:
        return targets, away
    not_here = [d for d in targets if d not in services.fleet]
    try:
        where = cluster_calls.holders(services.conn, not_here, time.time())
    except db.ERRORS as e:  # asked here: "not connected", as before the cluster
        log.warning("app control: reading the device leases failed: %s", e)
        where = {}
    here = []
    for device_id in targets:
        holder = where.get(device_id)
        if holder is None or holder[0] == services.releaser_id:
            here.append(device_id)
        else:
            away.setdefault(holder, []).append(device_id)
    return here, away


async def _forward_control(
    services: Services,
    operator: str,
    action: str,
    *,
    holder: tuple[str, str],
    devices: list[str],
    outcomes: dict[str, AppControlOutcome],
) -> None:
    releaser_id, address = holder
    calls = _calls(services)
    assert calls is not None
    params = {"action": action, "devices": devices}
    try:
        answer = await calls.forward(
            releaser_id, "app_control", params, operator, FORWARD_CONTROL_TIMEOUT
        )
        got = {o.device_id: o for o in (_outcome(r) for r in answer["results"])}
    except (FleetpushError, KeyError, TypeError, ValueError) as e:
        why = _forward_error(e, address, devices)
        got = {}
    for device_id in devices:
        outcomes[device_id] = got.get(device_id) or AppControlOutcome(
            device_id=device_id, ok=False, error=why
        )


def _forward_error(e: BaseException, address: str, devices: list[str]) -> str:
    """One line saying which releaser failed to answer for which device(s)."""
    which = f"device {devices[0]}" if len(devices) == 1 else f"devices {', '.join(devices)}"
    if isinstance(e, cluster_calls.ForwardTimeout):
        return f"releaser {address} holding {which} {e}"
    return f"releaser {address} holding {which} failed: {e}"


def _outcome(doc: dict[str, Any]) -> AppControlOutcome:
    status = doc.get("status")
    return AppControlOutcome(
        device_id=str(doc["device_id"]),
        ok=bool(doc["ok"]),
        error=doc.get("error"),
        status=None if status is None else AppStatus(**status),
    )


def _elsewhere(services: Services, device_id: str) -> str:
    """Why a known device cannot be asked here: not connected, or live on
    another releaser of the fleet (its lease, leases.py: issue 15), which can
    (on SQLite, or when its lease could not be read: the console may ask it)."""
    if device_id in services.fleet:  # here, but pending: as before
        return "not connected"
    holder = services.leases.holders([device_id], time.time()).get(device_id)
    if holder is None:
        return "not connected"
    return f"connected to releaser {holder}, not this one [ask it there: --server {holder}]"


def _calls(services: Services) -> ForwardedCalls | None:
    return None if services.cluster is None else services.cluster.calls


def forwarded_runner(services: Services) -> cluster_calls.Runner:
    """What this releaser runs for another one (cluster_calls.py): the local paths.

    Raises RpcError/Unavailable as the local handlers do (the caller's answer).
    """

    async def run(
        method: str, operator: str, params: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        if method == "app_control":
            results = await control_here(
                services, operator, str(params["action"]), [str(d) for d in params["devices"]]
            )
            return {"results": [attrs.asdict(r) for r in results]}
        if method == "app_logs":
            device_id = str(params["device_id"])
            live = services.fleet.get(device_id)
            if live is None or not live.can_take_commands:
                raise Unavailable(f"device {device_id}: not connected")
            tail = await _ask_logs(live, AppLogs(lines=int(params["lines"])))
            return {"lines": tail.lines, "dropped": tail.dropped}
        raise Unavailable(f"{method} is not forwarded")

    return run


async def app_logs(services: Services, call: Call, p: AppLogs) -> None:
    """The device's last ``p.lines`` lines; with ``p.follow``, then its new ones as events.

    A device live on another releaser: its tail is forwarded there; ``follow``
    is refused naming that releaser (specs/SCALE.md §5).

    Raises :class:`Unavailable` (not connected; the other releaser did not
    answer or failed; follow across releasers), RpcError (the device's refusal).
    """
    live = services.fleet.get(p.device_id)
    if live is None or not live.can_take_commands:
        if services.devices.get(p.device_id) is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"no device {p.device_id!r}")
        _, away = _split_by_holder(services, [p.device_id])
        if not away:
            raise Unavailable(f"device {p.device_id}: {_elsewhere(services, p.device_id)}")
        [(releaser_id, address)] = away
        if p.follow:
            # Not forwarded: every line would be a row and a notification,
            # kept alive across two releasers' lifetimes (specs/SCALE.md §5).
            raise Unavailable(
                f"device {p.device_id}: connected to releaser {address}, and --follow is "
                f"not forwarded between releasers [follow it there: --server {address}]"
            )
        await call.respond(await _forward_logs(services, call, p, releaser_id, address))
        return
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


async def _forward_logs(
    services: Services, call: Call, p: AppLogs, releaser_id: str, address: str
) -> AppLogLines:
    """The tail of a device live on another releaser. Raises Unavailable (it did not answer)."""
    calls = _calls(services)
    assert calls is not None
    params = {"device_id": p.device_id, "lines": p.lines}
    try:
        answer = await calls.forward(
            releaser_id, "app_logs", params, call.operator or "", FORWARD_LOGS_TIMEOUT
        )
        return AppLogLines(
            lines=[str(line) for line in answer["lines"]],
            dropped=int(answer["dropped"]),
            device_id=p.device_id,
        )
    except (FleetpushError, KeyError, TypeError, ValueError) as e:
        raise Unavailable(_forward_error(e, address, [p.device_id])) from e


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
                "event",
                Event(seq=0, time=time.time(), kind="app_log", device_id=device_id, data=data),
            )
        await call.notify(
            "event",
            Event(
                seq=0,
                time=time.time(),
                kind="app_log_end",
                device_id=device_id,
                data={"reason": "the device disconnected"},
            ),
        )
    except PeerClosed:
        pass
    finally:
        _unfollow(relay, live, device_id, follower)


def app_log(services: Services, call: Call, p: AppLogLines) -> None:
    """A device's ``app_log`` notification: to its followers (dropped if none)."""
    services.app_logs.deliver(call.device_id, p)
