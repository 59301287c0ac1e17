"""The dashboard's way into the releaser: the operator methods' own handlers.

Every page and action calls a handler from the session's route table
(server/session.py ``ROUTES``, passed in by app.py), with a :class:`Caller`
whose name is the signed-in operator's label: what the web does is checked,
audited and recorded exactly as the same request over the operator protocol
(§7.7), and this package never sees a ``Session``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import trio
from fleetpush.protocol import CloseCode, FleetpushError
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import DeviceInfo, ReleaseInfo

from fleetpush.net.peer import PeerClosed

from ..call import Call, Caller
from ..registry import DeviceRegistry, device_info
from ..releases import ReleaseStore
from ..services import Services

log = logging.getLogger("fleetpush.server.web")

#: The devices page's orders besides the device id, as SQL (a whitelist: never user text).
SORTS: Final = {
    "last_seen": "last_seen DESC, device_id",
    "version": "version, device_id",
    "state": "state, device_id",
    "first_seen": "first_seen DESC, device_id",
}

#: ``notify(method, params)``: where a streaming handler's notifications go.
Notify = Callable[[str, object], Awaitable[None]]


class WebCall(Call):
    """A :class:`Call` answered into memory instead of onto a connection.

    Only operator methods are called this way; chunk streams (``get_chunks``)
    are a device's, so the DATA-frame methods are never used here.
    """

    __slots__ = ("_notify", "answered", "result")

    def __init__(self, caller: Caller, notify: Notify | None) -> None:
        self.caller = caller
        self._notify = notify
        self.answered = False
        self.result: object = None

    async def respond(self, result: object) -> None:
        self.answered = True
        self.result = result

    async def notify(self, method: str, params: object) -> None:
        if self._notify is None:
            raise PeerClosed(CloseCode.NORMAL, "this web request takes no notifications")
        await self._notify(method, params)



class _WebLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"web operator={self.extra['operator']}: {msg}", kwargs  # type: ignore[index]


@attrs.frozen
class ReleaseDetail:
    """One release as its page shows it: the listing's row, files, signers, history."""

    info: ReleaseInfo
    #: (path, size, mode) of each file, in the signed manifest's order
    files: list[tuple[str, int, int]]
    #: the key ids that signed the manifest (§8.3)
    signers: list[str]
    #: (old status, new status, time, operator) of each change, oldest first
    history: list[tuple[str | None, str, float, str]]


class Operations:
    """Calls operator methods as a signed-in operator (trio thread only).

    Two read-only views have no operator method, and are read from the
    stores directly: a release's files and signers (``fleetpush release
    show`` reads the same from the data dir) and device counts by channel.
    """

    def __init__(self, services: Services, routes: Mapping[str, Any]) -> None:
        self.services = services
        self._routes = routes

    async def call(
        self,
        operator: str,
        method: str,
        params: object,
        *,
        nursery: trio.Nursery | None = None,
        notify: Notify | None = None,
    ) -> Any:
        """Run ``method``'s handler as ``operator``; its result.

        A streaming handler that starts a task (``app_logs`` with follow)
        needs ``nursery`` (the task ends with it) and ``notify``. Raises what
        the handler raises (FleetpushError subclasses; RpcError).
        """

        def spawn(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
            if nursery is None:
                raise FleetpushError(f"{method} needs a stream the dashboard did not open")
            nursery.start_soon(fn, *args)

        caller = Caller(
            role="operator",
            name=operator,
            app=None,
            log=_WebLog(log, {"operator": operator}),
            spawn=spawn,
        )
        call = WebCall(caller, notify)
        route = self._routes[method]
        answer = route.answer.value
        if answer == "result":
            result = route.handler(self.services, call, params)
            if inspect.isawaitable(result):  # its database calls run off-thread (db_calls.py)
                result = await result
            return result
        await route.handler(self.services, call, params)
        return call.result

    async def release(self, app: str, version: str) -> ReleaseDetail:
        """The release page's facts, read through the database runner
        (server/db_calls.py: off the trio thread on PostgreSQL). Raises NotFound."""
        return await self.services.calls.run(_release_detail, self.services.releases, app, version)

    async def sorted_devices(
        self, filters: dict[str, str | None], sort: str, offset: int, limit: int
    ) -> tuple[list[DeviceInfo], bool]:
        """A page of devices in ``sort`` order (a key of :data:`SORTS`); and whether more follow.

        ``list_devices`` pages by device id only (§7.7); the dashboard's other
        orders read the registry here, with the same filters but ``connected``
        (known only in memory, fleet.py). Offset paging: at 10,000 devices a
        page costs a few milliseconds (scripts/web_bench.py). The rows are read
        through the database runner (server/db_calls.py), ``connected`` here.
        """
        rows = await self.services.calls.run(
            _sorted_rows, self.services.devices, filters, sort, offset, limit
        )
        fleet = self.services.fleet
        devices = [device_info(r, r["device_id"] in fleet, listed=True) for r in rows[:limit]]
        return devices, len(rows) > limit

    def audit(self, kind: str, operator: str) -> None:
        """Record a dashboard-only happening (``web_login``, ``web_logout``) in the history."""
        self.services.events.emit(kind, None, {"operator": operator})

    async def channel_counts(self) -> dict[str, int]:
        """Accepted devices by channel (one GROUP BY over the registry, off-thread)."""
        return await self.services.calls.run(_channel_counts, self.services.devices)


def _sorted_rows(
    registry: DeviceRegistry, filters: dict[str, str | None], sort: str, offset: int, limit: int
) -> list[Any]:
    """The database part of ``sorted_devices``: up to ``limit + 1`` rows."""
    registry.writer.flush()
    query = "SELECT * FROM devices WHERE 1 = 1"
    args: list[Any] = []
    for name, column in (("state", "state"), ("version", "version"), ("app", "app"),
                         ("group", "grp")):
        if filters.get(name) is not None:
            query += f" AND {column} = ?"
            args.append(filters[name])
    query += f" ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?"
    return list(registry.conn.execute(query, [*args, limit + 1, offset]))


def _channel_counts(registry: DeviceRegistry) -> dict[str, int]:
    registry.writer.flush()
    rows = registry.conn.execute(
        "SELECT COALESCE(channel, '?'), COUNT(*) FROM devices"
        " WHERE enrollment = 'accepted' GROUP BY 1"
    )
    return {str(r[0]): int(r[1]) for r in rows}


def _release_detail(store: ReleaseStore, app: str, version: str) -> ReleaseDetail:
    """Statements and parsing only: safe in a worker thread. Raises NotFound."""
    record = store.get(app, version)
    manifest = Manifest.from_bytes(record.signed.signed)
    return ReleaseDetail(
        info=record.info(),
        files=[(f.path, f.size, f.mode) for f in manifest.files],
        signers=[s.keyid for s in record.signed.signatures],
        history=store.history(app, version),
    )
