"""The operator's RPC client: connect to the releaser, authenticate, call methods.

Every operator command of the console (``fleetpush devices``, ``push``,
``watch`` ...) and the demo and bench go through :func:`connect`::

    async with connect("127.0.0.1:7878", key, name="ops") as op:
        for device in await op.list_devices(app="sensor"):
            ...
        async for event in op.watch():
            ...

Errors are translated at this boundary into a small set, each named for what
the user must do about it (and mapped to an exit code by the CLI):
:class:`Unreachable` (transport), and the request outcomes the releaser
raises too (fleetpush.protocol.errors, one class per ``ErrorCode``):
:class:`AuthRefused` (``Forbidden``), :class:`NotFound`, :class:`Conflict`,
:class:`BadRequest`; :class:`OperatorError` for the rest.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any, Final

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetpush.net.dial import (
    AddressError,
    DialError,
    dial,
    format_address,
    parse_address,
    single_exception,
)
from fleetpush.net.peer import Peer, PeerClosed, TransportError
from fleetpush.net.tls import ClientTls
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    FleetpushError,
    NotificationReceived,
    RpcError,
)
from fleetpush.protocol.errors import BadRequest, Conflict, Forbidden, NotFound
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import (
    MAX_PAGE,
    AppControl,
    AppControlOutcome,
    AppControlResult,
    AppLogLines,
    AppLogs,
    DeployCreate,
    DeployFilter,
    DeployList,
    DeploymentInfo,
    DeployRef,
    DeployShow,
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
    Hello,
    Push,
    PushResult,
    ReleaseFilter,
    ReleaseInfo,
    ReleaseList,
    SetReleaseStatus,
    StatusResult,
    Watch,
)

DEFAULT_TIMEOUT = 10.0
#: app_control waits for devices that may each take their stop_timeout (server: 60 s).
APP_CONTROL_TIMEOUT = 75.0
#: Events buffered between the connection's reader and a slow watcher; when
#: full the reader waits (the socket then pushes back on the releaser).
WATCH_BUFFER = 256


class OperatorError(FleetpushError):
    """An operator request failed; ``str()`` is a message for the user."""


class Unreachable(OperatorError):
    """The releaser could not be reached, or the connection dropped."""


class MethodUnknown(OperatorError):
    """The releaser does not know the method: it is older than this console."""


#: The releaser refused the operator key, or the method to this session. The
#: outcomes are the protocol's classes, the same the releaser raises.
AuthRefused = Forbidden

_BY_CODE: dict[int, type[FleetpushError]] = {
    ErrorCode.AUTH_FAILED: AuthRefused,
    ErrorCode.FORBIDDEN: AuthRefused,
    ErrorCode.REJECTED: AuthRefused,
    ErrorCode.PENDING: AuthRefused,
    ErrorCode.VERSION_MISMATCH: AuthRefused,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.INVALID_PARAMS: BadRequest,
    ErrorCode.INVALID_REQUEST: BadRequest,
    ErrorCode.METHOD_NOT_FOUND: MethodUnknown,
}


#: What the operator was doing, by RPC method: messages name the user's
#: action, not the wire method (issue 11, item 4).
_ACTIONS: dict[str, str] = {
    "status": "releaser status",
    "list_devices": "listing devices",
    "get_device": "showing the device",
    "app_control": "app control",
    "app_logs": "logs",
    "list_events": "listing events",
    "forget_device": "forgetting the device",
    "set_enrollment": "changing the device's enrolment",
    "list_releases": "listing releases",
    "set_release_status": "changing the release status",
    "push": "push",
    "watch": "watch",
    "deploy_create": "creating the deployment",
    "deploy_list": "listing deployments",
    "deploy_show": "showing the deployment",
    "deploy_pause": "pausing the deployment",
    "deploy_resume": "resuming the deployment",
    "deploy_abort": "aborting the deployment",
}


def _translate(e: BaseException, method: str) -> FleetpushError:
    what = _ACTIONS.get(method, method)
    if isinstance(e, RpcError):
        return _BY_CODE.get(e.code, OperatorError)(f"{what}: {e.message}")
    if isinstance(e, trio.TooSlowError):
        return Unreachable(f"{what}: the releaser did not answer in time")
    if isinstance(e, PeerClosed):
        return Unreachable(f"{what}: connection closed by the releaser ({e.code}: {e.reason})")
    if isinstance(e, OSError | TransportError):
        return Unreachable(f"{what}: {e}")
    return OperatorError(f"{what}: {e}")


class OperatorClient:
    """A connected, authenticated operator session. Create with :func:`connect`."""

    def __init__(self, peer: Peer, events: trio.MemoryReceiveChannel[Event]) -> None:
        self.peer = peer
        self._events = events
        self.timeout = DEFAULT_TIMEOUT

    async def call(self, method: str, params: object) -> Any:
        """One request; raises the outcome class matching the answer (see module docstring)."""
        try:
            return await self.peer.request(method, params, timeout=self.timeout)
        except (RpcError, PeerClosed, TransportError, trio.TooSlowError, OSError) as e:
            raise _translate(e, method) from e

    async def status(self) -> StatusResult:
        result: StatusResult = await self.call("status", Empty())
        return result

    async def list_devices(
        self,
        *,
        app: str | None = None,
        group: str | None = None,
        state: str | None = None,
        version: str | None = None,
        connected: bool | None = None,
    ) -> list[DeviceInfo]:
        """Every device that matches, fetched page after page (specs/PROTOCOL.md §7.7)."""
        devices: list[DeviceInfo] = []
        after: str | None = None
        while True:
            page: DeviceList = await self.call(
                "list_devices",
                DeviceFilter(
                    app=app,
                    group=group,
                    after=after,
                    state=state,
                    version=version,
                    connected=connected,
                ),
            )
            devices += page.devices
            if page.next is None or not page.devices:
                return devices
            after = page.next

    async def get_device(self, device_id: str, *, history: int = 50) -> DeviceDetail:
        """One device's full record, newest events and pushes. Raises NotFound."""
        result: DeviceDetail = await self.call(
            "get_device", GetDevice(device_id=device_id, history=history)
        )
        return result

    async def list_events(
        self,
        *,
        device_id: str | None = None,
        kinds: Sequence[str] = (),
        since: float | None = None,
        push_id: str | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """The newest ``limit`` stored events that match, oldest first (§7.7)."""
        events: list[Event] = []
        before: int | None = None
        while len(events) < limit:
            page: EventList = await self.call(
                "list_events",
                EventFilter(
                    device_id=device_id,
                    kinds=list(kinds),
                    since=since,
                    push_id=push_id,
                    before=before,
                    limit=min(MAX_PAGE, limit - len(events)),
                ),
            )
            events += page.events
            if page.next is None or not page.events:
                break
            before = page.next
        events.reverse()
        return events

    async def forget_device(self, device_id: str, *, force: bool = False) -> ForgetResult:
        """Delete a device from the registry; ``force`` disconnects a connected one."""
        result: ForgetResult = await self.call(
            "forget_device", ForgetDevice(device_id=device_id, force=force)
        )
        return result

    async def set_enrollment(self, device_id: str, decision: str) -> DeviceInfo:
        result: DeviceInfo = await self.call(
            "set_enrollment", Enrollment(device_id=device_id, decision=decision)
        )
        return result

    async def list_releases(self, *, app: str | None = None) -> list[ReleaseInfo]:
        """Every release, fetched page after page (specs/PROTOCOL.md §7.7)."""
        releases: list[ReleaseInfo] = []
        after: str | None = None
        while True:
            page: ReleaseList = await self.call(
                "list_releases", ReleaseFilter(app=app, after=after)
            )
            releases += page.releases
            if page.next is None or not page.releases:
                return releases
            after = page.next

    async def set_release_status(self, app: str, version: str, status: str) -> ReleaseInfo:
        result: ReleaseInfo = await self.call(
            "set_release_status", SetReleaseStatus(app=app, version=version, status=status)
        )
        return result

    async def approve(self, app: str, version: str) -> ReleaseInfo:
        """Walk a release through the lifecycle to ``approved`` (draft -> pre-released -> approved).

        Each step is an ordinary ``set_release_status``, recorded by the releaser.
        """
        info = None
        for release in await self.list_releases(app=app):
            if release.version == version:
                info = release
        if info is None:
            raise NotFound(f"no release {app} {version}")
        if info.status == "draft":
            info = await self.set_release_status(app, version, "pre-released")
        if info.status != "approved":
            info = await self.set_release_status(app, version, "approved")
        return info

    async def push(
        self,
        *,
        app: str,
        version: str,
        mode: str = "force",
        restart: bool | None = None,
        devices: list[str] | None = None,
        group: str | None = None,
        all: bool = False,
    ) -> PushResult:
        """Send ``push`` (mode ``force``, ``stage`` or ``apply``) to the named targets."""
        result: PushResult = await self.call(
            "push",
            Push(
                app=app,
                version=version,
                mode=mode,
                restart=restart,
                devices=list(devices or []),
                group=group,
                all=all,
            ),
        )
        return result

    async def app_control(
        self, action: str, devices: Sequence[str] = (), *, group: str | None = None
    ) -> list[AppControlOutcome]:
        """Start, stop or restart the supervised apps of ``devices`` / ``group`` (§7.7).

        One outcome per device; a device that could not do it says why in ``error``.
        """
        params = AppControl(action=action, devices=list(devices), group=group)
        # Each device may take its stop_timeout: wait longer than one request.
        async with self._longer(APP_CONTROL_TIMEOUT):
            result: AppControlResult = await self.call("app_control", params)
        return result.results

    async def app_logs(self, device_id: str, lines: int = 100) -> list[str]:
        """The last ``lines`` lines of a device's supervised app (§7.7)."""
        result: AppLogLines = await self.call("app_logs", AppLogs(device_id=device_id, lines=lines))
        return result.lines

    async def follow_logs(
        self, device_id: str, lines: int = 100
    ) -> AsyncGenerator[AppLogLines, None]:
        """The last ``lines`` lines, then new ones as the device sends them.

        Ends when the device disconnects (the releaser sends ``app_log_end``);
        raises :class:`Unreachable` if the releaser connection closed abnormally.
        """
        first: AppLogLines = await self.call(
            "app_logs", AppLogs(device_id=device_id, lines=lines, follow=True)
        )
        yield first
        async for event in self._events:
            if event.device_id != device_id:
                continue
            if event.kind == "app_log_end":
                return
            if event.kind == "app_log":
                data = event.data
                yield AppLogLines(
                    lines=[str(x) for x in data.get("lines", [])],
                    dropped=int(data.get("dropped", 0)),
                    device_id=device_id,
                )
        code = self.peer.close_code
        if code is not None and code != 1000:
            raise Unreachable(f"logs ended: {self.peer.close_reason or code}")

    @asynccontextmanager
    async def _longer(self, timeout: float) -> AsyncIterator[None]:
        saved, self.timeout = self.timeout, max(self.timeout, timeout)
        try:
            yield
        finally:
            self.timeout = saved

    async def deploy_create(self, params: DeployCreate) -> DeploymentInfo:
        """Create a deployment (specs/PROTOCOL.md §7.7.1)."""
        result: DeploymentInfo = await self.call("deploy_create", params)
        return result

    async def deploy_list(
        self, *, app: str | None = None, states: list[str] | None = None
    ) -> list[DeploymentInfo]:
        """Deployments, newest first."""
        result: DeployList = await self.call(
            "deploy_list", DeployFilter(app=app, states=list(states or []))
        )
        return result.deployments

    async def deploy_show(self, deployment_id: str) -> DeploymentInfo:
        """A deployment with every device, fetched page after page."""
        page: DeploymentInfo = await self.call(
            "deploy_show", DeployShow(deployment_id=deployment_id)
        )
        devices = list(page.devices)
        while page.next is not None and page.devices:
            page = await self.call(
                "deploy_show", DeployShow(deployment_id=deployment_id, after=page.next)
            )
            devices += page.devices
        return attrs.evolve(page, devices=devices, next=None)

    async def deploy_pause(self, deployment_id: str) -> DeploymentInfo:
        result: DeploymentInfo = await self.call(
            "deploy_pause", DeployRef(deployment_id=deployment_id)
        )
        return result

    async def deploy_resume(
        self, deployment_id: str, *, retry_failed: bool = False
    ) -> DeploymentInfo:
        result: DeploymentInfo = await self.call(
            "deploy_resume", DeployRef(deployment_id=deployment_id, retry_failed=retry_failed)
        )
        return result

    async def deploy_abort(self, deployment_id: str) -> DeploymentInfo:
        result: DeploymentInfo = await self.call(
            "deploy_abort", DeployRef(deployment_id=deployment_id)
        )
        return result

    async def watch(self, history: int = 0) -> AsyncIterator[Event]:
        """Subscribe to fleet events and yield them as they arrive.

        ``history`` asks for that many past events first. Ends when the
        connection closes; raises :class:`Unreachable` if it closed abnormally.
        """
        await self.call("watch", Watch(history=history))
        async for event in self._events:
            yield event
        code = self.peer.close_code
        if code is not None and code != 1000:
            raise Unreachable(f"watch ended: {self.peer.close_reason or code}")


log = logging.getLogger("fleetpush.operator")

#: With several releaser addresses, each gets at most this long for TCP (and,
#: separately, TLS) before the next is tried (issue 15): a dead releaser must
#: not eat the whole command timeout.
FAILOVER_CONNECT_TIMEOUT: Final = 3.0


def _targets(address: str | tuple[str, int] | Sequence[str]) -> list[tuple[str, int]]:
    """The addresses to try, in order: ``HOST:PORT``, ``a,b``, a pair or a list.

    Raises :class:`BadRequest`.
    """
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int):
        return [(str(address[0]), address[1])]
    items = [address] if isinstance(address, str) else [str(a) for a in address]
    texts = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not texts:
        raise BadRequest("server: no releaser address given (want HOST:PORT[,HOST:PORT...])")
    try:
        return [parse_address(t) for t in texts]
    except AddressError as e:
        raise BadRequest(f"server: {e}") from e


@asynccontextmanager
async def connect(
    address: str | tuple[str, int] | Sequence[str],
    key: Ed25519PrivateKey,
    *,
    name: str = "operator",
    timeout: float = DEFAULT_TIMEOUT,
    tls: ClientTls | None = None,
) -> AsyncIterator[OperatorClient]:
    """Connect to the releaser at ``address`` and authenticate as operator ``name``.

    ``address`` is ``HOST:PORT`` (:func:`fleetpush.net.dial.parse_address`) or a
    ``(host, port)`` pair; with ``tls`` the connection runs over TLS
    (:mod:`fleetpush.net.tls`: CA or pin), all through :func:`fleetpush.net.dial.dial`.
    Several addresses (``"a:7878,b:7878"`` or a list, issue 15) are tried in
    order, each with a connect timeout of at most
    :data:`FAILOVER_CONNECT_TIMEOUT`; the first that answers is used (logged
    at INFO, so ``-v`` shows it). Only an unreachable releaser moves on to the
    next: a refusal (auth, TLS pin) is the answer.
    Raises :class:`BadRequest` (``address`` is not an address),
    :class:`Unreachable` (no connection, handshake timeout, TLS failure; with
    several addresses, naming each) or
    :class:`AuthRefused` (key not listed in the releaser's config).
    """
    targets = _targets(address)
    per_try = timeout if len(targets) == 1 else min(timeout, FAILOVER_CONNECT_TIMEOUT)
    send, receive = trio.open_memory_channel[Event](WATCH_BUFFER)

    async def on_notification(peer: Peer, note: NotificationReceived) -> None:
        if note.method == "event" and isinstance(note.params, Event):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send.send(note.params)

    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="operator",
        peer_id=name,
        public_key=public_bytes(key),
    )
    try:
        async with _unwrapped(), AsyncExitStack() as stack:
            failures: list[DialError] = []
            for host, port in targets:
                where = format_address(host, port)
                try:
                    link = await stack.enter_async_context(
                        dial(
                            (host, port),
                            key,
                            hello,
                            tls=tls,
                            timeout=per_try,
                            handshake_timeout=timeout,
                            on_notification=on_notification,
                            name=f"operator@{where}",
                        )
                    )
                except DialError as e:
                    log.info("releaser %s: %s", where, e)
                    failures.append(e)
                    continue
                except (RpcError, TransportError) as e:
                    err = _translate(e, "handshake")
                    if isinstance(e, PeerClosed) and e.code in (1010, 1011, 1014):
                        err = AuthRefused(f"the releaser refused the operator key: {e.reason}")
                    raise err from e
                log.info("releaser %s answered", where)
                break
            else:
                if len(failures) == 1:
                    raise Unreachable(str(failures[0])) from failures[0]
                tried = ", ".join(format_address(h, p) for h, p in targets)
                raise Unreachable(
                    f"no releaser answered (tried {tried}): " + "; ".join(str(f) for f in failures)
                ) from failures[-1]
            if link.auth.status != "accepted":
                raise AuthRefused(f"operator key not accepted ({link.auth.status})")
            peer = link.peer

            async def close_events_when_closed() -> None:
                await peer.closed.wait()
                send.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_events_when_closed)
                client = OperatorClient(peer, receive)
                client.timeout = timeout
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        send.close()


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """Let the body's own exception out of the nurseries it passed through.

    trio wraps an exception raised in a nursery's body in an ExceptionGroup;
    callers of :func:`connect` want to catch ``NotFound``, not a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        single = single_exception(group)
        if single is None:
            raise
        raise single from single.__cause__


__all__ = [
    "AuthRefused",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "OperatorClient",
    "OperatorError",
    "Unreachable",
    "connect",
    "single_exception",
]
