"""Operator methods (specs/PROTOCOL.md §7.7), plus ``status`` for either role.

Every handler takes ``(services, call, params)``: the releaser's shared
state (services.py) and the request's caller (call.py). A handler reaches a
connected device only through its :class:`~.fleet.DeviceLink`, never a session.

Push modes, as sent to each target device (the client interprets them, see
fleetpush.client):

- ``force``: ``__force_update__`` with the push's ``restart`` (default: the
  manifest's): download the release, then apply it (restarting if true);
- ``stage``: ``__force_update__`` with ``restart=False``: download and stage
  only; the device applies it at its next start or on a later ``apply``;
- ``apply``: ``__apply_update__`` with the push's ``restart``: apply the staged
  release. Targets named by group or ``all`` are narrowed to the devices that
  reported this version ``staged``; devices named one by one are sent the
  command regardless, and answer themselves whether they have it staged.

Only ``pre-released`` and ``approved`` releases can be pushed; a device that
was pushed a pre-released release may fetch it whatever its channel. The
result lists the targets, those whose command was handed to their live
connection (``sent``), and those that will get it when they next connect
(``queued``, kept in SQLite across restarts).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import attrs
from fleetpush.protocol import CloseCode
from fleetpush.protocol.messages import (
    DeviceDetail,
    DeviceFilter,
    DeviceInfo,
    DeviceList,
    Empty,
    Enrollment,
    Event,
    EventFilter,
    EventList,
    ForgetDevice,
    ForgetResult,
    GetDevice,
    Push,
    PushResult,
    ReleaseFilter,
    ReleaseInfo,
    ReleaseList,
    SetReleaseStatus,
    StatusResult,
    Watch,
)

from fleetpush import __version__
from fleetpush.net.peer import PeerClosed

from .call import Call
from .errors import BadRequest, Conflict, NotFound
from .events import Watcher
from .push_core import deliver_push
from .registry import device_info
from .releases import ReleaseRecord, ReleaseStore
from .services import Services
from .targets import named_targets, pushable_release

#: Most history events a ``watch`` replays.
MAX_WATCH_HISTORY = 1000

#: About how many bytes one page of a listing may take (§7.7): far below the
#: 8 MiB message limit whatever the rows hold (issue 10, item 8).
PAGE_BYTES = 1024 * 1024


async def status(services: Services, call: Call, p: Any) -> StatusResult:
    by_version, by_state = await services.calls.run(services.devices.counts)
    return StatusResult(
        server_id=services.server_id,
        server_version=__version__,
        uptime=time.monotonic() - services.started_monotonic,
        connected=len(services.fleet),
        by_version=by_version,
        by_state=by_state,
        low_disk=services.disk.low,
    )


async def list_devices(services: Services, call: Call, p: DeviceFilter) -> DeviceList:
    """One page of devices (§7.7): at most ``p.limit`` rows and about :data:`PAGE_BYTES`.

    Rows leave out log tails and clip free text (registry.device_info), so
    any device's own reports cannot make a page exceed the message limit.
    """
    fleet = services.fleet
    devices: list[DeviceInfo] = []
    size, after, full = 0, p.after, False
    while not full:
        # ``connected`` is known only in memory (fleet.py), so it filters the
        # rows SQL returns; reading on until the page is full keeps a page a
        # page even when most devices are offline.
        # Off the trio thread on PostgreSQL (db_calls.py); the filter on
        # ``connected`` below reads the fleet here, on the trio thread.
        rows = await services.calls.run(
            functools.partial(
                services.devices.list,
                app=p.app,
                group=p.group,
                after=after,
                limit=p.limit + 1,
                state=p.state,
                version=p.version,
            )
        )
        # Which releaser each is live on: the lease rows, one query a page, so
        # every releaser of a fleet answers the same (leases.py, issue 15).
        held = await services.calls.run(
            services.leases.holders, [r["device_id"] for r in rows], time.time()
        )
        for row in rows:
            after = row["device_id"]
            holder = held.get(row["device_id"])
            connected = row["device_id"] in fleet or holder is not None
            if p.connected is not None and connected != p.connected:
                continue
            info = attrs.evolve(device_info(row, connected, listed=True), releaser=holder)
            dup = fleet.duplicates.get(info.device_id)
            if dup is not None:
                info = attrs.evolve(info, duplicate=dup.sentence())
            size += _size(info)
            if len(devices) == p.limit or (devices and size > PAGE_BYTES):
                full = True  # a row that does not fit: there is a next page
                break
            devices.append(info)
        else:
            if len(rows) <= p.limit:
                return DeviceList(devices=devices, next=None)
    return DeviceList(devices=devices, next=devices[-1].device_id)


async def get_device(services: Services, call: Call, p: GetDevice) -> DeviceDetail:
    """Everything about one device (§7.7): its full row, newest events and pushes.

    The three reads run off the trio thread on PostgreSQL (db_calls.py).
    Raises :class:`NotFound`.
    """
    calls = services.calls
    row = await calls.run(services.devices.require, p.device_id)
    held = await calls.run(services.leases.holders, [p.device_id], time.time())
    holder = held.get(p.device_id)
    connected = p.device_id in services.fleet or holder is not None
    info = attrs.evolve(device_info(row, connected), releaser=holder)
    dup = services.fleet.duplicates.get(p.device_id)
    if dup is not None:
        info = attrs.evolve(info, duplicate=dup.sentence())
    return DeviceDetail(
        device=info,
        history=await calls.run(services.events.history, p.history, p.device_id),
        deliveries=await calls.run(services.pushes.deliveries_of, p.device_id),
    )


async def list_events(services: Services, call: Call, p: EventFilter) -> EventList:
    """One page of the audit history, newest first (§7.7); read off-thread (db_calls.py)."""
    page = await services.calls.run(services.events.query, p)
    # A page must fit a message (§10) whatever the devices wrote into their
    # events: cut it at about PAGE_BYTES, the rest comes with ``next``.
    size = 0
    for i, event in enumerate(page.events):
        size += _size(event)
        if i and size > PAGE_BYTES:
            kept = page.events[:i]
            return EventList(events=kept, next=kept[-1].seq)
    return page


async def forget_device(services: Services, call: Call, p: ForgetDevice) -> None:
    """Delete a device from the registry (issue 10, item 8), audited as an event.

    A connected device is refused unless ``p.force``, which closes its
    connection (1014) once the row is gone. Raises NotFound, Conflict.
    """
    live = services.fleet.get(p.device_id)
    if live is not None and not p.force:
        raise Conflict(
            f"device {p.device_id} is connected: forgetting it needs force, which "
            "disconnects it (fleetpush devices forget --force)"
        )
    # Off the trio thread on PostgreSQL (db_calls.py). A link that came up
    # while the rows were deleted is closed below as well: its row is gone,
    # and it must enrol anew (issue 10, item 8).
    await services.calls.run(services.devices.forget, p.device_id)
    live = services.fleet.get(p.device_id) or live
    services.fleet.duplicates.pop(p.device_id, None)
    call.log.info("device %s forgotten by %s", p.device_id, call.operator)
    services.events.emit(
        "forgotten",
        p.device_id,
        {"operator": call.operator, "disconnected": live is not None},
    )
    if live is not None:
        await live.close(CloseCode.POLICY, "forgotten by an operator")
    await call.respond(ForgetResult(device_id=p.device_id, disconnected=live is not None))


async def set_enrollment(services: Services, call: Call, p: Enrollment) -> DeviceInfo:
    """Accept or reject a device; a connected one hears of it at once. Raises NotFound.

    The row is written off the trio thread on PostgreSQL (db_calls.py); the
    link is looked up after it, on the trio thread, so a device connecting
    meanwhile reads the new decision from the row or hears it here.
    """
    row = await services.calls.run(services.devices.set_enrollment, p.device_id, p.decision)
    live = services.fleet.get(p.device_id)
    if live is not None:
        live.set_enrollment(p.decision)
    call.log.info("device %s %s", p.device_id, p.decision)
    services.events.emit(
        "enrollment", p.device_id, {"decision": p.decision, "operator": call.operator}
    )
    return device_info(row, live is not None)


async def list_releases(services: Services, call: Call, p: ReleaseFilter) -> ReleaseList:
    """One page of releases by (app, sequence) (§7.7); ``next`` is ``[app, sequence]`` as JSON.

    Read off the trio thread on PostgreSQL (db_calls.py). Raises BadRequest
    (a cursor this releaser did not make).
    """
    return await services.calls.run(_release_page, services.releases, p)


def _release_page(store: ReleaseStore, p: ReleaseFilter) -> ReleaseList:
    """Statements and pure computation only: safe in a worker thread."""
    start: tuple[str, int] | None = None
    if p.after is not None:
        try:
            app, seq = json.loads(p.after)
            start = (str(app), int(seq))
        except (ValueError, TypeError) as e:
            raise BadRequest("list_releases: after is not a cursor from a previous page") from e
    releases: list[ReleaseInfo] = []
    size = 0
    more = False
    for info in store.list(p.app):
        if start is not None and (info.app, info.sequence) <= start:
            continue
        size += _size(info)
        if len(releases) >= p.limit or (releases and size > PAGE_BYTES):
            more = True
            break
        releases.append(info)
    last = releases[-1] if more else None
    return ReleaseList(
        releases=releases, next=None if last is None else json.dumps([last.app, last.sequence])
    )


def _size(obj: Any) -> int:
    """About how many bytes ``obj`` (a listing's row) takes on the wire."""
    total = 64
    for value in attrs.astuple(obj, recurse=False):
        if isinstance(value, str | bytes):
            total += len(value) + 8
        elif isinstance(value, dict):
            total += len(json.dumps(value, default=str))
        else:
            total += 9
    return total


async def set_release_status(services: Services, call: Call, p: SetReleaseStatus) -> ReleaseInfo:
    """Move a release along its lifecycle. Raises NotFound, IllegalTransition.

    Its transaction runs off the trio thread on PostgreSQL (db_calls.py); the
    event is emitted on the trio thread after it commits.
    """
    info = await services.calls.run(
        services.releases.set_status, p.app, p.version, p.status, call.operator or "?"
    )
    call.log.info("release %s %s is now %s", info.app, info.version, info.status)
    services.events.emit(
        "release_status",
        None,
        {
            "app": info.app,
            "version": info.version,
            "status": info.status,
            "operator": call.operator,
        },
    )
    return info


async def push(services: Services, call: Call, p: Push) -> PushResult:
    """Record a push and hand it to the targets that are online (see module docstring).

    The release and the targets are read off the trio thread on PostgreSQL
    (db_calls.py); the push itself (push_core.deliver_push: its transaction,
    then the hand-over to the links with no await between) on it. Raises
    NotFound (release, device, or no target), Conflict (release not
    pushable, device not accepted or of another app), BadRequest (targets).
    """
    record, targets = await services.calls.run(_push_targets, services, p)
    restart = record.restart if p.restart is None else p.restart
    return deliver_push(
        services,
        operator=call.operator or "?",
        app=p.app,
        version=record.version,
        mode=p.mode,
        restart=restart,
        selector={"devices": p.devices, "group": p.group, "all": p.all},
        targets=targets,
        now=time.time(),
    )


def _push_targets(services: Services, p: Push) -> tuple[ReleaseRecord, list[str]]:
    """The release and the targets of a push (statements only: db_calls.py)."""
    record = pushable_release(services.releases, p.app, p.version, "pushed")
    targets = named_targets(
        services.devices,
        p.app,
        p.devices,
        p.group,
        p.all,
        staged=record.version if p.mode == "apply" else None,
    )
    if not targets:
        raise NotFound("no accepted device matches the push's targets")
    return record, targets


async def watch(services: Services, call: Call, p: Watch) -> None:
    """Answer, then replay up to ``p.history`` stored events and relay live ones.

    A second ``watch`` on the same connection is answered and changes nothing.
    """
    if call.caller.watching:
        await call.respond(Empty())
        return
    watcher = services.events.subscribe()  # before reading history: nothing falls in between
    call.caller.watching = True
    try:
        history = services.events.history(min(max(p.history, 0), MAX_WATCH_HISTORY))
        await call.respond(Empty())
        call.spawn(_pump, call, watcher, history)
    except BaseException:
        # Dropped before the answer (PeerClosed, cancelled): _pump never runs, so
        # unsubscribe here, or the hub offers every event to a dead queue forever
        # (issue 10, item 6; found by the live fuzz campaign).
        watcher.close()
        raise


async def _pump(call: Call, watcher: Watcher, history: list[Event]) -> None:
    # Skip the live events the history already replayed. By membership, not
    # by "seq <= the last replayed": another releaser's events carry seqs
    # from its own block, lower than ones already seen here (specs/SCALE.md).
    replayed = {event.seq for event in history}
    try:
        for event in history:
            await call.notify("event", event)
        async for event in watcher:
            if event.seq in replayed:
                continue
            await call.notify("event", event)
            dropped = watcher.take_dropped()
            if dropped is not None:
                await call.notify("event", dropped)
    except PeerClosed:
        pass
    finally:
        watcher.close()
