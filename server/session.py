"""One connection to the releaser: handshake, authentication, and dispatch.

Handshake (specs/PROTOCOL.md §5): ``hello`` is answered with the server id, a
fresh ``cid`` and a random 32-byte nonce after checking the protocol major
version (a mismatch is refused with ``VERSION_MISMATCH`` naming both); ``auth``
must carry an Ed25519 signature over :func:`auth_payload` by the announced
key. Operators' keys must be in the config. Devices: a known id announced with
another key is refused (``AUTH_FAILED``); a rejected device is refused
(``REJECTED``); under ``manual`` enrollment a new device is ``pending`` and
every request it makes gets ``PENDING`` until an operator accepts it. An
acceptance reaches a connected pending device at once (its queued pushes are
delivered right away); a rejection closes its connection.

Roles: device sessions may call only device methods and operators only
operator methods (``FORBIDDEN`` otherwise); ``status`` is open to both.

Pushes are delivered by one task per device session, so a push to 1000
connected devices costs the operator's request one transaction and 1000
non-blocking hand-offs; each device's task sends its command and waits for the
ack without holding up the others. Commands left undelivered (device offline,
no ack) stay queued in SQLite and are sent when the device next connects.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import secrets
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Final, cast

import trio
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    Connection,
    ErrorCode,
    FleetpushError,
    Manifest,
    RpcError,
    Side,
    auth_payload,
    verify_challenge,
)
from fleetpush.protocol.connection import EncodedParams, encode_params
from fleetpush.protocol.events import NotificationReceived, RequestReceived
from fleetpush.protocol.frames import PROTOCOL_MAJOR
from fleetpush.protocol.messages import (
    METHODS,
    Ack,
    AppStatus,
    Auth,
    AuthResult,
    CheckUpdate,
    CheckUpdateResult,
    GetChunks,
    GetChunksResult,
    GetManifest,
    GetManifestResult,
    Hello,
    HelloResult,
    UpdateCommand,
    UpdateProgress,
)

from fleetpush.net.peer import Peer, PeerClosed, open_peer
from fleetpush.net.tls import TlsError, check_device_certificate, peer_certificate

from . import gc_policy, operator
from .chunks import ChunkJob, read_verified_chunk, send_chunks
from .errors import ChunkUnavailable, ServerError
from .events import Watcher
from .registry import PendingCommand
from .releases import PUSHABLE, ReleaseRecord

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("fleetpush.server")

DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
OUTBOX_SIZE: Final = 64
#: ``downloading`` progress is written to the history at most this often per device.
PROGRESS_PERSIST_INTERVAL: Final = 1.0


class _SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        s = cast("Session", self.extra["session"])  # type: ignore[index]
        return f"cid={s.cid} device={s.device_id or '-'}: {msg}", kwargs


def _chunk_job(record: ReleaseRecord, manifest: Manifest, file: int, chunk: int) -> ChunkJob:
    entry = manifest.files[file]
    length = entry.chunk_length(manifest.chunk_size, chunk)
    return ChunkJob(
        file=file,
        chunk=chunk,
        key=(str(record.dir), file, chunk),
        size=length,
        load=functools.partial(
            read_verified_chunk,
            record.dir / entry.path,
            chunk * manifest.chunk_size,
            length,
            manifest.hash,
            entry.chunks[chunk],
        ),
        what=f"{entry.path} chunk {chunk} of {manifest.app} {manifest.version}",
    )


def _following_chunk(manifest: Manifest, file: int, chunk: int) -> tuple[int, int] | None:
    """The chunk a sequential download asks for after (file, chunk), if any."""
    if chunk + 1 < len(manifest.files[file].chunks):
        return file, chunk + 1
    for f in range(file + 1, len(manifest.files)):
        if manifest.files[f].chunks:
            return f, 0
    return None


@functools.lru_cache(maxsize=16)
def _command_params(app: str, version: str, restart: bool, push_id: str) -> EncodedParams:
    """A push's command params, msgpack-encoded once for all its targets."""
    return encode_params(UpdateCommand(app=app, version=version, restart=restart, push_id=push_id))


class Session:
    def __init__(self, server: Server, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.cid = secrets.token_hex(6)
        self.role: str | None = None
        self.hello: Hello | None = None
        self.nonce = b""
        self.device_id: str | None = None
        self.operator: str | None = None
        self.enrollment: str | None = None
        self.peer: Peer | None = None
        self.log = _SessionLog(log, {"session": self})
        self._tasks: trio.Nursery | None = None
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[PendingCommand | None](
            OUTBOX_SIZE
        )
        self._check_db = True
        #: push target rows handed to this session's delivery task already.
        self.attempted: set[int] = set()
        self._last_progress_persist = 0.0
        self.watcher: Watcher | None = None
        self._gc_counted = False  # told gc_policy this device session opened

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.server.config
        conn = Connection(
            Side.SERVER,
            now=trio.current_time(),
            heartbeat=cfg.heartbeat,
            handshake_timeout=cfg.handshake_timeout,
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
        if self.device_id is not None and self.server.sessions.get(self.device_id) is self:
            del self.server.sessions[self.device_id]
            self.server.devices.touch(self.device_id, time.time())
            self.server.events.emit("disconnected", self.device_id, {"cid": self.cid})

    async def close(self, code: int, reason: str) -> None:
        if self.peer is not None:
            await self.peer.close(code, reason)

    def start_task(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` for as long as this connection lives."""
        assert self._tasks is not None
        self._tasks.start_soon(fn, *args)

    @property
    def has_room(self) -> bool:
        return self._outbox_send.statistics().current_buffer_used < OUTBOX_SIZE

    def offer_command(self, cmd: PendingCommand) -> bool:
        """Hand a push to the delivery task without waiting; False if the outbox is full."""
        if not self.has_room:
            return False
        self.attempted.add(cmd.target_id)
        self._outbox_send.send_nowait(cmd)
        return True

    def wake(self) -> None:
        """Look for queued pushes in the database (after an acceptance, a full outbox...)."""
        self._check_db = True
        # If the outbox is full the task checks the flag after the item it is on.
        with contextlib.suppress(trio.WouldBlock):
            self._outbox_send.send_nowait(None)

    @property
    def can_take_commands(self) -> bool:
        return self.role == "device" and self.enrollment == "accepted"

    # --- dispatch ----------------------------------------------------------------------

    async def _on_request(self, peer: Peer, ev: RequestReceived) -> None:
        if ev.method == "hello":
            await self._hello(peer, ev.id, ev.params)
            return
        if ev.method == "auth":
            await self._auth(peer, ev.id, ev.params)
            return
        if self.role == "device" and self.enrollment != "accepted":
            raise RpcError(
                ErrorCode.PENDING, f"device {self.device_id} is pending operator approval"
            )
        spec = METHODS[ev.method]
        if spec.sender not in ("client", "peer", self.role):
            raise RpcError(ErrorCode.FORBIDDEN, f"a {self.role} session may not call {ev.method!r}")
        try:
            if ev.method == "get_chunks":
                await self._get_chunks(peer, ev.id, ev.params)
                return
            if ev.method == "watch":
                await operator.watch(self.server, self, peer, ev.id, ev.params)
                return
            result = await self._call(ev.method, ev.params)
        except ServerError as e:
            raise RpcError(e.code, str(e)) from e
        await peer.respond(ev.id, result)

    async def _call(self, method: str, params: Any) -> Any:
        if method == "check_update":
            return self._check_update(params)
        if method == "get_manifest":
            return self._get_manifest(params)
        if method == "status":
            return operator.status(self.server)
        handler = operator.HANDLERS.get(method)
        if handler is None:
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"{method!r} is not served here")
        return handler(self.server, self, params)

    async def _on_notification(self, peer: Peer, ev: NotificationReceived) -> None:
        if not (self.role == "device" and self.enrollment == "accepted"):
            return  # nothing to record from pending devices or operators
        try:
            if ev.method == "update_progress":
                self._progress(ev.params)
            elif ev.method == "app_status":
                self._app_status(ev.params)
        except Exception:
            # A notification has no answer to carry the error: log it, keep the connection.
            self.log.exception("%s notification could not be recorded", ev.method)

    # --- handshake ---------------------------------------------------------------------

    async def _refuse(
        self, peer: Peer, rid: int, code: ErrorCode, message: str, close: CloseCode
    ) -> None:
        self.log.warning("handshake refused: %s", message)
        try:
            await peer.respond_error(rid, code, message)
        finally:
            await peer.close(close, message)

    async def _hello(self, peer: Peer, rid: int, hello: Hello) -> None:
        major = hello.protocol_version.split(".", 1)[0]
        if major != str(PROTOCOL_MAJOR):
            await self._refuse(
                peer,
                rid,
                ErrorCode.VERSION_MISMATCH,
                f"protocol version {hello.protocol_version} is not supported: "
                f"this releaser speaks {PROTOCOL_VERSION}",
                CloseCode.VERSION_MISMATCH,
            )
            return
        if len(hello.public_key) != 32:
            await self._refuse(
                peer, rid, ErrorCode.INVALID_PARAMS, "public_key must be 32 bytes", CloseCode.POLICY
            )
            return
        if hello.role == "device" and not DEVICE_ID.fullmatch(hello.peer_id):
            await self._refuse(
                peer,
                rid,
                ErrorCode.INVALID_PARAMS,
                "device id must be 1-128 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric)",
                CloseCode.POLICY,
            )
            return
        if hello.role == "device" and self.server.config.tls_client_ca is not None:
            try:
                check_device_certificate(peer_certificate(self.stream), hello.peer_id)
            except TlsError as e:
                await self._refuse(peer, rid, ErrorCode.AUTH_FAILED, str(e), CloseCode.AUTH_FAILED)
                return
        self.hello = hello
        self.nonce = secrets.token_bytes(32)
        await peer.respond(
            rid,
            HelloResult(
                protocol_version=PROTOCOL_VERSION,
                server_id=self.server.server_id,
                cid=self.cid,
                heartbeat=self.server.config.heartbeat,
                nonce=self.nonce,
            ),
        )

    async def _auth(self, peer: Peer, rid: int, auth: Auth) -> None:
        hello = self.hello
        assert hello is not None  # the state machine allows auth only after hello_ok
        payload = auth_payload(
            server_id=self.server.server_id,
            cid=self.cid,
            nonce=self.nonce,
            role=hello.role,
            peer_id=hello.peer_id,
            public_key=hello.public_key,
        )
        try:
            verify_challenge(hello.public_key, auth.signature, payload)
        except FleetpushError:
            await self._refuse(
                peer,
                rid,
                ErrorCode.AUTH_FAILED,
                "bad signature over the nonce",
                CloseCode.AUTH_FAILED,
            )
            return
        if hello.role == "operator":
            if hello.public_key not in self.server.config.operator_keys:
                await self._refuse(
                    peer, rid, ErrorCode.AUTH_FAILED, "unknown operator key", CloseCode.AUTH_FAILED
                )
                return
            self.role, self.operator = (
                "operator",
                f"{hello.peer_id} ({hello.public_key.hex()[:16]})",
            )
            peer.name = f"cid={self.cid} operator={hello.peer_id}"
            self.log.info("operator %s authenticated", self.operator)
            await peer.respond(rid, AuthResult(status="accepted"))
            return
        await self._auth_device(peer, rid, hello)

    async def _auth_device(self, peer: Peer, rid: int, hello: Hello) -> None:
        server = self.server
        row = server.devices.get(hello.peer_id)
        if row is not None and bytes(row["public_key"]) != hello.public_key:
            await self._refuse(
                peer,
                rid,
                ErrorCode.AUTH_FAILED,
                f"device {hello.peer_id} is registered with another public key",
                CloseCode.AUTH_FAILED,
            )
            return
        if row is not None and row["enrollment"] == "rejected":
            await self._refuse(
                peer,
                rid,
                ErrorCode.REJECTED,
                f"device {hello.peer_id} was rejected by an operator",
                CloseCode.AUTH_FAILED,
            )
            return
        new = row is None
        policy = "accepted" if server.config.enrollment == "auto" else "pending"
        row = server.devices.register(hello, policy, time.time())
        self.role, self.device_id, self.enrollment = "device", hello.peer_id, row["enrollment"]
        peer.name = f"cid={self.cid} device={self.device_id}"
        old = server.sessions.get(hello.peer_id)
        server.sessions[hello.peer_id] = self
        if old is not None:
            old.device_id = None  # its cleanup must not unregister us
            assert self._tasks is not None
            self._tasks.start_soon(old.close, CloseCode.POLICY, "replaced by a newer connection")
        self.log.info(
            "authenticated (%s; app %s %s, channel %s)",
            self.enrollment,
            hello.app,
            hello.version,
            hello.channel,
        )
        await peer.respond(rid, AuthResult(status=self.enrollment))
        server.events.emit(
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
            server.events.emit("enrollment", self.device_id, {"decision": "pending"})
        assert self._tasks is not None
        self._tasks.start_soon(self._deliver_loop)
        self._gc_counted = True
        gc_policy.connection_opened()

    def set_enrollment(self, decision: str) -> None:
        """An operator decided about this (connected) device."""
        self.enrollment = decision
        if decision == "accepted":
            self.wake()
        else:
            assert self._tasks is not None
            self._tasks.start_soon(self.close, CloseCode.AUTH_FAILED, "rejected by an operator")

    # --- device methods ------------------------------------------------------------------

    def _device_app(self, app: str) -> None:
        assert self.hello is not None
        if self.hello.app is not None and app != self.hello.app:
            raise RpcError(ErrorCode.FORBIDDEN, f"this device runs {self.hello.app!r}, not {app!r}")

    def _check_update(self, p: CheckUpdate) -> CheckUpdateResult:
        self._device_app(p.app)
        assert self.device_id is not None
        server = self.server
        now = time.time()
        server.devices.record_check(
            self.device_id, version=p.version, channel=p.channel, sequence=p.sequence, now=now
        )
        record = server.releases.offer(
            app=p.app, channel=p.channel, sequence=p.sequence, installed=p.version, now=now
        )
        if record is None:
            return CheckUpdateResult(available=False)
        return CheckUpdateResult(
            available=True,
            version=record.version,
            sequence=record.sequence,
            manifest=record.signed,
            status=record.status,
        )

    def _visible(self, app: str, version: str) -> ReleaseRecord:
        """The release if this device may fetch it; raises NotFound or RpcError(FORBIDDEN)."""
        self._device_app(app)
        assert self.device_id is not None
        server = self.server
        record = server.releases.get(app, version)
        if record.status == "approved":
            return record
        if record.status == "pre-released":
            row = server.devices.get(self.device_id)
            channel = row["channel"] if row is not None else None
            if channel == "beta" or server.pushes.targets_of(self.device_id, app, record.version):
                return record
        raise RpcError(
            ErrorCode.FORBIDDEN,
            f"release {app} {record.version} is {record.status}: not available to this device",
        )

    def _get_manifest(self, p: GetManifest) -> GetManifestResult:
        record = self._visible(p.app, p.version)
        return GetManifestResult(manifest=record.signed, status=record.status)

    async def _get_chunks(self, peer: Peer, rid: int, p: GetChunks) -> None:
        server = self.server
        if server.draining:
            raise RpcError(ErrorCode.UNAVAILABLE, "the releaser is shutting down")
        record = self._visible(p.app, p.version)
        manifest = server.manifests.get(str(record.dir), record.signed.signed)
        wanted: list[tuple[int, int]] = []
        for file_index, chunk_index in p.chunks:
            if not 0 <= file_index < len(manifest.files):
                raise RpcError(
                    ErrorCode.INVALID_PARAMS, f"no file {file_index} in {p.app} {p.version}"
                )
            entry = manifest.files[file_index]
            if not 0 <= chunk_index < len(entry.chunks):
                raise RpcError(ErrorCode.INVALID_PARAMS, f"no chunk {chunk_index} in {entry.path}")
            wanted.append((file_index, chunk_index))
        peer.conn.start_chunks(rid, wanted)
        jobs = [_chunk_job(record, manifest, f, c) for f, c in wanted]
        follow = _following_chunk(manifest, *wanted[-1]) if wanted else None

        async def send(job: ChunkJob, data: bytes) -> None:
            await peer.send_chunk(rid, job.file, job.chunk, data)

        async def finish() -> None:
            await peer.respond(rid, GetChunksResult(sent=len(wanted)))

        server.inflight_chunks += 1
        try:
            await send_chunks(
                server.cache,
                jobs,
                send,
                finish,
                prefetch=None if follow is None else _chunk_job(record, manifest, *follow),
            )
        except ChunkUnavailable as e:
            self.log.error("refusing to serve %s: %s", e, e.__cause__)
            raise
        finally:
            server.inflight_chunks -= 1
            if server.inflight_chunks == 0:
                server.chunks_idle.set()

    def _progress(self, p: UpdateProgress) -> None:
        assert self.device_id is not None
        server = self.server
        now = time.time()
        server.devices.record_progress(self.device_id, p, now)
        if p.push_id:
            server.pushes.record_result(p.push_id, self.device_id, p.state, now)
        persist = True
        if p.state == "downloading":
            mono = trio.current_time()
            persist = mono - self._last_progress_persist >= PROGRESS_PERSIST_INTERVAL
            if persist:
                self._last_progress_persist = mono
        if p.state in ("committed", "rolled_back", "failed"):
            self.log.info(
                "update %s %s: %s%s", p.app, p.version, p.state, f" ({p.error})" if p.error else ""
            )
        server.events.emit(
            "progress",
            self.device_id,
            {
                "state": p.state,
                "app": p.app,
                "version": p.version,
                "push_id": p.push_id,
                "bytes_done": p.bytes_done,
                "bytes_total": p.bytes_total,
                "error": p.error,
            },
            persist=persist,
        )

    def _app_status(self, s: AppStatus) -> None:
        assert self.device_id is not None
        data = {
            "state": s.state,
            "pid": s.pid,
            "uptime": s.uptime,
            "exit_code": s.exit_code,
            "error": s.error,
            "log_tail": list(s.log_tail[-20:]),
        }
        self.server.devices.record_app_status(self.device_id, data, time.time())
        self.server.events.emit("app_status", self.device_id, data)

    # --- push delivery --------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        server = self.server
        assert self.device_id is not None
        while True:
            if self._check_db and self.can_take_commands:
                self._check_db = False
                while (
                    cmd := server.pushes.next_pending(self.device_id, self.attempted)
                ) is not None:
                    self.attempted.add(cmd.target_id)
                    server.pushes.mark(cmd.target_id, "sent", "", time.time())
                    await self._deliver(cmd)
            cmd = await self._outbox_receive.receive()
            if cmd is not None:
                await self._deliver(cmd, fresh=True)

    async def _deliver(self, cmd: PendingCommand, *, fresh: bool = False) -> None:
        """Send one command and record the ack. ``fresh``: the push handler just checked it."""
        server = self.server
        assert self.peer is not None and self.device_id is not None
        status = "approved" if fresh else server.releases.status_of(cmd.app, cmd.version)
        if status not in PUSHABLE:
            server.pushes.mark(
                cmd.target_id, "cancelled", f"release is {status or 'gone'}", time.time()
            )
            return
        method = "__apply_update__" if cmd.mode == "apply" else "__force_update__"
        # stage = download now, apply later: the client stages an update sent with restart=False.
        restart = False if cmd.mode == "stage" else cmd.restart
        params = _command_params(cmd.app, cmd.version, restart, cmd.push_id)
        server.events.emit(
            "command_sent",
            self.device_id,
            {"push_id": cmd.push_id, "method": method, "version": cmd.version, "restart": restart},
            persist=False,
        )
        try:
            ack: Ack = await self.peer.request(method, params, timeout=server.config.send_timeout)
        except RpcError as e:
            state, detail = "error", f"[{e.code}] {e.message}"
        except trio.TooSlowError:
            state, detail = "timeout", "no acknowledgement in time"
        except PeerClosed:
            return  # still 'sent': delivered again on the next connection
        else:
            state, detail = ("accepted", "") if ack.accepted else ("refused", ack.reason)
        self.log.info("%s %s %s: %s %s", method, cmd.app, cmd.version, state, detail)
        server.pushes.mark(cmd.target_id, state, detail, time.time())
        server.events.emit(
            "command_result",
            self.device_id,
            {
                "push_id": cmd.push_id,
                "method": method,
                "version": cmd.version,
                "state": state,
                "detail": detail,
            },
        )
