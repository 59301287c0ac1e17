"""One connection to the releaser: handshake, role gate, dispatch, push delivery.

Handshake (specs/PROTOCOL.md §5): ``hello`` is answered with the server id, a
fresh ``cid`` and a random 32-byte nonce after checking the protocol major
version (a mismatch is refused with ``VERSION_MISMATCH`` naming both, §5.4);
``auth`` must carry an Ed25519 signature over :func:`auth_payload` by the
announced key (§5.2). Operators' keys must be in the config. Devices (§5.3): a
known id announced with another key is refused (``AUTH_FAILED``); a rejected
device is refused (``REJECTED``); under ``manual`` enrollment a new device is
``pending`` and every request it makes gets ``PENDING`` until an operator
accepts it. An acceptance reaches a connected pending device at once (its
queued pushes are delivered right away); a rejection closes its connection.
The checks that need no I/O are ``fleetpush.protocol.handshake``'s
``check_hello`` and ``check_auth``; a refusal is answered by the error, then
``bye`` with its close code (§5.5). Only the TLS certificate check and the
registry lookup happen here.

Roles (§7.7, §7.9): device sessions may call only device methods and
operators only operator methods (``FORBIDDEN`` otherwise); ``status`` is open
to both. That rule is ``protocol.handshake.may_send``, applied by the
Connection itself from the hello's role, so it is not restated here.
:data:`ROUTES` is the one table from method to handler and how it answers;
handlers live in device_api.py, operator_api.py and deploy_api.py, take ``(services, call,
params)`` and never see this class.

Pushes (§7.4) are delivered by one task per device session, so a push to 1000
connected devices costs the operator's request one transaction and 1000
non-blocking hand-offs; each device's task sends its command and waits for the
ack without holding up the others. Commands left undelivered (device offline,
no ack) stay queued in SQLite and are sent when the device next connects. A
session is the fleet's :class:`~.fleet.DeviceLink` for its device.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, cast

import attrs
import trio
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    Connection,
    ErrorCode,
    RpcError,
    Side,
)
from fleetpush.protocol.connection import EncodedParams, encode_params
from fleetpush.protocol.errors import RequestRefused
from fleetpush.protocol.events import NotificationReceived, RequestReceived
from fleetpush.protocol.freshness import NONCE_SIZE
from fleetpush.protocol.handshake import AcceptedHello, Refusal, check_auth, check_hello
from fleetpush.protocol.limits import MAX_SERVER_CONTAINERS
from fleetpush.protocol.messages import (
    Ack,
    Auth,
    AuthResult,
    Hello,
    HelloResult,
    SignedManifest,
    UpdateCommand,
)

from fleetpush.net.peer import Peer, PeerClosed, open_peer
from fleetpush.net.tls import TlsError, check_device_certificate, peer_certificate

from . import app_remote, deploy_api, device_api, gc_policy, operator_api, p2p_api
from .call import Call, Caller
from .errors import ServerError
from .fleet import TAKEOVER_WINDOW
from .push_fanout import AckRecorder, SharedCommand, record_answer
from .registry import PendingCommand
from .releases import PUSHABLE
from .services import Services

#: Heartbeats of silence before the releaser sends its own ping (§6.2): past
#: the devices' one, early enough that a silent peer is still dropped after
#: (RELEASER_PING_AFTER + IDLE_HEARTBEATS - 1) heartbeats at most.
RELEASER_PING_AFTER: Final = 1.25
log = logging.getLogger("fleetpush.server")

OUTBOX_SIZE: Final = 64


# --- the dispatch table ----------------------------------------------------------------


class Answer(enum.Enum):
    """How a route's handler answers."""

    RESULT = "result"  # returns the result; the session responds
    STREAM = "stream"  # async; responds itself (DATA frames, then a result; or events)
    NONE = "none"  # a notification: nothing to answer (§3.1)


@attrs.frozen
class Route:
    handler: Callable[[Services, Call, Any], Any]
    answer: Answer


#: Who may call each method is the catalogue's sender column (§7.9), checked by
#: the Connection before an event reaches this table.
ROUTES: Final[dict[str, Route]] = {
    "status": Route(operator_api.status, Answer.RESULT),
    "check_update": Route(device_api.check_update, Answer.RESULT),
    "get_manifest": Route(device_api.get_manifest, Answer.RESULT),
    "get_chunks": Route(device_api.get_chunks, Answer.STREAM),
    "get_root": Route(device_api.get_root, Answer.RESULT),
    "get_freshness": Route(device_api.get_freshness, Answer.RESULT),
    "update_progress": Route(device_api.update_progress, Answer.NONE),
    "app_status": Route(device_api.app_status, Answer.NONE),
    "report_outcomes": Route(device_api.report_outcomes, Answer.RESULT),
    "list_devices": Route(operator_api.list_devices, Answer.RESULT),
    "get_device": Route(operator_api.get_device, Answer.RESULT),
    "list_events": Route(operator_api.list_events, Answer.RESULT),
    "set_enrollment": Route(operator_api.set_enrollment, Answer.RESULT),
    "forget_device": Route(operator_api.forget_device, Answer.STREAM),
    "list_releases": Route(operator_api.list_releases, Answer.RESULT),
    "set_release_status": Route(operator_api.set_release_status, Answer.RESULT),
    "push": Route(operator_api.push, Answer.RESULT),
    "watch": Route(operator_api.watch, Answer.STREAM),
    "app_control": Route(app_remote.app_control, Answer.STREAM),
    "app_logs": Route(app_remote.app_logs, Answer.STREAM),
    "app_log": Route(app_remote.app_log, Answer.NONE),
    "deploy_create": Route(deploy_api.deploy_create, Answer.RESULT),
    "deploy_list": Route(deploy_api.deploy_list, Answer.RESULT),
    "deploy_show": Route(deploy_api.deploy_show, Answer.RESULT),
    "deploy_pause": Route(deploy_api.deploy_pause, Answer.RESULT),
    "deploy_resume": Route(deploy_api.deploy_resume, Answer.RESULT),
    "deploy_abort": Route(deploy_api.deploy_abort, Answer.RESULT),
    "get_peers": Route(p2p_api.get_peers, Answer.RESULT),
    "report_peer": Route(p2p_api.report_peer, Answer.RESULT),
    "p2p_bytes": Route(p2p_api.p2p_bytes, Answer.NONE),
    "p2p_view": Route(p2p_api.p2p_view, Answer.RESULT),
}


# --- the session -------------------------------------------------------------------------


class _SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        s = cast("Session", self.extra["session"])  # type: ignore[index]
        return f"cid={s.cid} device={s.device_id or '-'}: {msg}", kwargs


@functools.lru_cache(maxsize=16)
def _command_params(app: str, version: str, restart: bool, push_id: str) -> EncodedParams:
    """A push's command params, msgpack-encoded once for all its targets."""
    return encode_params(UpdateCommand(app=app, version=version, restart=restart, push_id=push_id))


class Session:
    """One accepted connection, from handshake to close (see module docstring)."""

    def __init__(
        self,
        services: Services,
        stream: trio.abc.Stream,
        *,
        handshake_timeout: float | None = None,
        on_authenticated: Callable[[], None] | None = None,
        source: str = "?",
    ) -> None:
        self.services = services
        self.stream = stream
        #: the peer's address (admission.source_of), for the duplicate-id report
        self.source = source
        #: shorter than the config's when the releaser is busy (admission.py)
        self._handshake_timeout = handshake_timeout or services.config.handshake_timeout
        #: frees this connection's handshake slot (admission.py)
        self._on_authenticated = on_authenticated
        self.cid = secrets.token_hex(6)
        self.hello: Hello | None = None
        #: what the hello announced (§5.1), e.g. "blake3" (§7.2).
        self.capabilities: frozenset[str] = frozenset()
        self.nonce = b""
        self.device_id: str | None = None
        self.enrollment: str | None = None
        #: who called, once authenticated (handlers get it through their Call).
        self.caller: Caller | None = None
        self.peer: Peer | None = None
        self.log = _SessionLog(log, {"session": self})
        self._tasks: trio.Nursery | None = None
        # Commands handed over by pushes, for the delivery task. A plain deque
        # (at most OUTBOX_SIZE, see has_room), made on first use: nothing waits
        # on it, so a trio channel's two ends and state were 1.5 KiB of every
        # idle link (issue 15).
        self._outbox: collections.deque[PendingCommand] | None = None
        self._check_db = True
        #: the delivery task is running (_kick)
        self._delivering = False
        #: push target rows handed to this session's delivery task already.
        self.attempted: set[int] = set()
        self._gc_counted = False  # told gc_policy this device session opened

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.services.config
        conn = Connection(
            Side.SERVER,
            now=trio.current_time(),
            heartbeat=cfg.heartbeat,
            handshake_timeout=self._handshake_timeout,
            frame_budget=self.services.frame_budget,
            # no message a releaser accepts needs more (§10): keeps a peer's
            # decoded body from pinning memory and the event loop (issue 10)
            max_containers=MAX_SERVER_CONTAINERS,
            # Devices ping every heartbeat (the value our hello result
            # announces); we ping only one that went quiet past it, so an idle
            # link costs one exchange per heartbeat, not two (§6.2, issue 15).
            ping_after=RELEASER_PING_AFTER,
        )
        self.log.debug("connection accepted")
        async with trio.open_nursery() as tasks:
            self._tasks = tasks
            async with open_peer(
                self.stream,
                conn,
                name=f"cid={self.cid}",
                on_request=self._on_request,
                on_notification=self._on_notification,
                send_timeout=cfg.send_timeout,
                frame_timeout=cfg.frame_timeout,
            ) as peer:
                self.peer = peer
                await peer.wait_closed()
            tasks.cancel_scope.cancel()
        assert self.peer is not None
        self.log.info("closed (%s): %s", self.peer.close_code, self.peer.close_reason)

    def cleanup(self) -> None:
        """Forget this session (called once it ended, however it ended)."""
        if self._gc_counted:
            self._gc_counted = False
            gc_policy.connection_closed()
        if self.device_id is not None and self.services.fleet.detach(self.device_id, self):
            self.services.app_logs.device_gone(self.device_id)
            self.services.leases.drop(self.device_id)
            self.services.devices.touch(self.device_id, time.time())
            self.services.events.emit("disconnected", self.device_id, {"cid": self.cid})

    async def close(self, code: int, reason: str) -> None:
        if self.peer is not None:
            await self.peer.close(code, reason)

    def start_task(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` for as long as this connection lives."""
        assert self._tasks is not None
        self._tasks.start_soon(fn, *args)

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """:meth:`start_task`, or nothing once the connection has ended (DeviceLink)."""
        if self._tasks is not None and self.peer is not None and not self.peer.closed.is_set():
            with contextlib.suppress(RuntimeError):  # the nursery is closing
                self._tasks.start_soon(fn, *args)

    async def request(self, method: str, params: object, timeout: float) -> object:
        """Ask the device; its answer (DeviceLink). Raises RpcError, PeerClosed, TooSlowError."""
        if self.peer is None:
            raise PeerClosed(CloseCode.GOING_AWAY, "not connected")
        answer: object = await self.peer.request(method, params, timeout=timeout)
        return answer

    # --- DeviceLink (fleet.py) ---------------------------------------------------------

    @property
    def has_room(self) -> bool:
        return self._outbox is None or len(self._outbox) < OUTBOX_SIZE

    @property
    def can_take_commands(self) -> bool:
        return self.device_id is not None and self.enrollment == "accepted"

    def offer_command(self, cmd: PendingCommand) -> bool:
        """Hand a push to the delivery task without waiting; False if the outbox is full."""
        if not self.has_room:
            return False
        self.attempted.add(cmd.target_id)
        if self._outbox is None:
            self._outbox = collections.deque()
        self._outbox.append(cmd)
        self._kick()
        return True

    def wake(self) -> None:
        """Look for queued pushes in the database (after an acceptance, a full outbox...)."""
        # A running delivery task checks the flag before it ends (_deliver_loop).
        self._check_db = True
        self._kick()

    def set_enrollment(self, decision: str) -> None:
        """An operator decided about this (connected) device."""
        self.enrollment = decision
        if decision == "accepted":
            if self.peer is not None:  # it had the pre-auth frame limits (connection.py)
                self.peer.conn.open_limits()
            self.wake()
        else:
            self.start_task(self.close, CloseCode.AUTH_FAILED, "rejected by an operator")

    # --- dispatch ----------------------------------------------------------------------

    async def _on_request(self, peer: Peer, ev: RequestReceived) -> None:
        if ev.method == "hello":
            await self._hello(peer, ev.id, ev.params)
            return
        if ev.method == "auth":
            await self._auth(peer, ev.id, ev.params)
            return
        caller = self.caller
        assert caller is not None  # the state machine allows other requests only when OPEN
        if caller.role == "device" and self.enrollment != "accepted":
            # §5.3: data names the device (specs/vectors frames.json "error: with data").
            raise RpcError(
                ErrorCode.PENDING,
                f"device {self.device_id} is pending operator approval",
                {"device_id": self.device_id},
            )
        route = ROUTES.get(ev.method)
        if route is None or route.answer is Answer.NONE:
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"{ev.method!r} is not served here")
        call = Call(caller, peer, ev.id)
        metrics = self.services.metrics
        with metrics.timed(ev.method):
            try:
                if route.answer is Answer.STREAM:
                    await route.handler(self.services, call, ev.params)
                    return
                result = route.handler(self.services, call, ev.params)
                if inspect.isawaitable(result):  # its database calls run off-thread (db_calls.py)
                    result = await result
            except (RequestRefused, ServerError) as e:
                metrics.request_errors.labels(ev.method, metrics.code_name(e.code)).inc()
                raise RpcError(e.code, str(e)) from e
            except RpcError as e:
                metrics.request_errors.labels(ev.method, metrics.code_name(e.code)).inc()
                raise
            await peer.respond(ev.id, result)

    async def _on_notification(self, peer: Peer, ev: NotificationReceived) -> None:
        caller = self.caller
        if caller is None or caller.role != "device" or self.enrollment != "accepted":
            return  # nothing to record from pending devices or operators
        route = ROUTES.get(ev.method)
        if route is None or route.answer is not Answer.NONE:
            return
        try:
            route.handler(self.services, Call(caller, peer, None), ev.params)
        except Exception:
            # A notification has no answer to carry the error: log it, keep the connection.
            self.log.exception("%s notification could not be recorded", ev.method)

    # --- handshake ---------------------------------------------------------------------

    async def _refuse(self, peer: Peer, rid: int, refusal: Refusal) -> None:
        """The error, then bye with the refusal's close code (§5.5)."""
        self.log.warning("handshake refused: %s", refusal.reason)
        self.services.metrics.handshake_failures.labels(refusal.code.name).inc()
        try:
            await peer.respond_error(rid, refusal.code, refusal.reason)
        finally:
            await peer.close(refusal.close, refusal.reason)

    async def _hello(self, peer: Peer, rid: int, hello: Hello) -> None:
        outcome = check_hello(hello)
        if (
            isinstance(outcome, AcceptedHello)
            and hello.role == "device"
            and self.services.config.tls_client_ca is not None
        ):
            try:
                check_device_certificate(peer_certificate(self.stream), hello.peer_id)
            except TlsError as e:
                outcome = Refusal(
                    code=ErrorCode.AUTH_FAILED, reason=str(e), close=CloseCode.AUTH_FAILED
                )
        if isinstance(outcome, Refusal):
            await self._refuse(peer, rid, outcome)
            return
        self.hello = hello
        self.capabilities = outcome.capabilities
        self.nonce = secrets.token_bytes(32)
        await peer.respond(
            rid,
            HelloResult(
                protocol_version=PROTOCOL_VERSION,
                server_id=self.services.server_id,
                cid=self.cid,
                heartbeat=self.services.config.heartbeat,
                nonce=self.nonce,
                # §8.5: a device on an older root walks to this one.
                root_version=self.services.roots.latest_version(),
                freshness=self._freshness(),
            ),
        )

    def _freshness(self, command: tuple[str, UpdateCommand] | None = None) -> SignedManifest | None:
        """A statement answering the device's hello nonce (§8.6), naming ``command`` if given."""
        signer, hello = self.services.freshness, self.hello
        if signer is None or hello is None or hello.role != "device":
            return None
        if hello.nonce is None or len(hello.nonce) != NONCE_SIZE:
            return None
        return signer.statement(hello.nonce, hello.app, now=time.time(), command=command)

    async def _auth(self, peer: Peer, rid: int, auth: Auth) -> None:
        services = self.services
        hello = self.hello
        assert hello is not None  # the state machine allows auth only after hello_ok
        row = (
            await services.calls.run(services.devices.get, hello.peer_id)
            if hello.role == "device"
            else None
        )
        outcome = check_auth(
            hello,
            auth,
            server_id=services.server_id,
            cid=self.cid,
            nonce=self.nonce,
            operator_keys=services.config.operator_keys,
            registered_key=None if row is None else bytes(row["public_key"]),
            enrollment=None if row is None else row["enrollment"],
        )
        if isinstance(outcome, Refusal):
            await self._refuse(peer, rid, outcome)
            return
        if hello.role == "operator":
            label = f"{hello.peer_id} ({hello.public_key.hex()[:16]})"
            self.caller = Caller("operator", label, None, self.log, self.start_task)
            peer.name = f"cid={self.cid} operator={hello.peer_id}"
            self.log.info("operator %s authenticated", label)
            if self._on_authenticated is not None:
                self._on_authenticated()
            await peer.respond(rid, AuthResult(status="accepted"))
            return
        await self._auth_device(peer, rid, hello, new=row is None)

    async def _auth_device(self, peer: Peer, rid: int, hello: Hello, *, new: bool) -> None:
        services = self.services
        dup = services.fleet.refuse_takeover(hello.peer_id, self.source, time.monotonic())
        if dup is not None:
            # Two devices share this id (fleet.py): keep the live one, send the
            # newcomer away, and say so once per ping-pong in the history.
            reason = (
                f"duplicate device id {dup.device_id}: it is connected from {dup.live} and "
                f"took over {dup.takeovers} times in {TAKEOVER_WINDOW:g}s; back off"
            )
            services.events.emit(
                "duplicate_device_id",
                dup.device_id,
                {"live": dup.live, "newcomer": dup.newcomer, "takeovers": dup.takeovers},
            )
            await self._refuse(
                peer, rid, Refusal(code=ErrorCode.CONFLICT, reason=reason, close=CloseCode.POLICY)
            )
            return
        policy = "accepted" if services.config.enrollment == "auto" else "pending"
        row = await services.calls.run(services.devices.register, hello, policy, time.time())
        self.device_id, self.enrollment = hello.peer_id, row["enrollment"]
        if self._on_authenticated is not None:
            self._on_authenticated()
        self.caller = Caller(
            "device",
            hello.peer_id,
            hello.app,
            self.log,
            self.start_task,
            capabilities=self.capabilities,
        )
        peer.name = f"cid={self.cid} device={self.device_id}"
        old = services.fleet.attach(hello.peer_id, self, self.source, time.monotonic())
        # Live here now, whichever releaser held it (newest wins, leases.py).
        services.leases.take(hello.peer_id, time.time())
        if old is not None:
            # Its cleanup will not detach us (fleet.py): only the current link may.
            self.start_task(old.close, CloseCode.POLICY, "replaced by a newer connection")
        self.log.info(
            "authenticated (%s; app %s %s, channel %s)",
            self.enrollment,
            hello.app,
            hello.version,
            hello.channel,
        )
        await peer.respond(rid, AuthResult(status=self.enrollment))
        services.events.emit(
            "connected",
            self.device_id,
            {
                "cid": self.cid,
                "app": hello.app,
                "version": hello.version,
                "channel": hello.channel,
                "enrollment": self.enrollment,
            },
        )
        if new and self.enrollment == "pending":
            services.events.emit("enrollment", self.device_id, {"decision": "pending"})
        self._kick()
        self._gc_counted = True
        gc_policy.connection_opened()

    # --- push delivery --------------------------------------------------------------------

    def _kick(self) -> None:
        """Run the delivery task if it is not running (it ends when idle: issue 15)."""
        if not self._delivering and self.device_id is not None:
            self._delivering = True
            self.spawn(self._deliver_loop, self.device_id)

    async def _deliver_loop(self, device_id: str) -> None:
        """Deliver what the database and the outbox hold, then end.

        Not one task for the connection's life: 100,000 idle device links
        would each keep a task (and its frames) parked on an empty outbox.
        Whatever fills the outbox or asks for a database check starts it
        again (:meth:`_kick`); nothing awaits between finding the outbox
        empty and clearing ``_delivering``, so no command is left behind.
        """
        pushes = self.services.pushes
        try:
            while True:
                if self._check_db and self.can_take_commands:
                    self._check_db = False
                    while (
                        cmd := await self.services.calls.run(
                            pushes.next_pending, device_id, set(self.attempted)
                        )
                    ) is not None:
                        self.attempted.add(cmd.target_id)
                        pushes.mark(cmd.target_id, "sent", "", time.time())
                        await self._deliver(device_id, cmd)
                if not self._outbox:
                    if self._check_db and self.can_take_commands:
                        continue
                    return
                await self._deliver(device_id, self._outbox.popleft(), fresh=True)
        finally:
            self._delivering = False

    async def _deliver(self, device_id: str, cmd: PendingCommand, *, fresh: bool = False) -> None:
        """Send one command and record the ack. ``fresh``: the push handler just checked it."""
        services = self.services
        assert self.peer is not None
        status = (
            "approved"
            if fresh
            else await services.calls.run(services.releases.status_of, cmd.app, cmd.version)
        )
        if status not in PUSHABLE:
            services.pushes.mark(
                cmd.target_id, "cancelled", f"release is {status or 'gone'}", time.time()
            )
            return
        method = "__apply_update__" if cmd.mode == "apply" else "__force_update__"
        # stage = download now, apply later: the client stages an update sent with restart=False.
        restart = False if cmd.mode == "stage" else cmd.restart
        params: EncodedParams | UpdateCommand = _command_params(
            cmd.app, cmd.version, restart, cmd.push_id
        )
        plain = UpdateCommand(
            app=cmd.app, version=cmd.version, restart=restart, push_id=cmd.push_id
        )
        signed = self._freshness((method, plain))
        if signed is not None:  # §7.4, §8.6: the command, signed for this connection
            params = attrs.evolve(plain, freshness=signed)
        services.events.emit(
            "command_sent",
            device_id,
            {"push_id": cmd.push_id, "method": method, "version": cmd.version, "restart": restart},
            persist=False,
        )
        answer: Ack | Exception
        try:
            answer = await self.peer.request(method, params, timeout=services.config.send_timeout)
        except (RpcError, trio.TooSlowError, PeerClosed) as e:
            answer = e
        record_answer(
            services,
            self.log,
            device_id,
            cmd.target_id,
            answer,
            push_id=cmd.push_id,
            method=method,
            version=cmd.version,
        )

    def send_command_now(self, target_id: int, command: SharedCommand) -> bool:
        """Write a push's command now, its ack recorded by callback (DeviceLink, push_fanout.py).

        False (nothing sent) while this link has other commands to deliver or
        its peer is sending (Peer.request_nowait): offer_command keeps order.
        """
        peer, device_id = self.peer, self.device_id
        if peer is None or device_id is None or self._delivering or self._outbox:
            return False
        if not self.can_take_commands:
            return False
        params = command.params
        signed = self._freshness((command.method, command.plain))
        if signed is not None:  # §7.4, §8.6: the command, signed for this connection
            params = encode_params(attrs.evolve(command.plain, freshness=signed))

        answered = AckRecorder(self.services, self.log, device_id, target_id, command)
        if not peer.request_nowait(
            command.method, params, answered, timeout=self.services.config.send_timeout
        ):
            return False
        self.attempted.add(target_id)
        self.services.events.emit(
            "command_sent",
            device_id,
            {
                "push_id": command.push_id,
                "method": command.method,
                "version": command.version,
                "restart": command.restart,
            },
            persist=False,
        )
        return True
