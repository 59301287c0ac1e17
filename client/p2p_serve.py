"""A device serving chunks it holds to other devices of its fleet (§7.11, issue 18).

Opt-in (``p2p = true``): without it no port is opened at all. The link is the
ordinary framed protocol with this device in the server's seat:

1. ``hello`` (role ``device``) and ``auth``: the asker signs this device's
   fresh nonce with its device key, exactly as towards the releaser (§5.2);
   there is no registry here, so any key that signs is accepted at this step;
2. ``present_token``: the releaser-signed peer token (protocol/p2p.py) must
   verify against the root's timestamp keys, name this device, the asker's id
   and the key it just proved, and be unexpired. Until then nothing is served;
3. ``get_manifest`` and ``get_chunks`` for the token's release only, with the
   same bounds the protocol core enforces on every link (lengths, ordering,
   request counts). Any other method is refused.

Caps (specs/THREATS.md "peers that flood"): at most ``max_peers`` links at a
time (the next waits unanswered for a slot, up to ``max_waiting`` of them),
``max_rate`` bytes/s over all links, and nothing while the device's own app
reports activity (``busy``): a busy device refuses ``get_chunks`` so the asker
moves on to another peer or the releaser.

Everything this module needs comes in through :class:`ServeContext`; it
never imports the agent that runs it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import attrs
import trio
from fleetpush.protocol import Connection, Side
from fleetpush.protocol.errors import CloseCode, ErrorCode, FleetpushError, RpcError
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.frames import PROTOCOL_VERSION
from fleetpush.protocol.handshake import AcceptedHello, Refusal, check_auth, check_hello
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import (
    Auth,
    AuthResult,
    Empty,
    GetChunks,
    GetChunksResult,
    GetManifest,
    GetManifestResult,
    Hello,
    HelloResult,
    SignedManifest,
)
from fleetpush.protocol.p2p import PeerToken, PresentToken, verify_peer_token
from fleetpush.protocol.trust import TrustRoot

from fleetpush.net.peer import Peer, open_peer

from .download_plan import spans

log = logging.getLogger("fleetpush.client.p2p")


@attrs.frozen
class Held:
    """A release this device can serve: its signed manifest and where its files are."""

    signed: SignedManifest
    manifest: Manifest
    files_dir: Path


@attrs.define
class Counters:
    """What this device has uploaded (``fleetpush status``)."""

    bytes_sent: int = 0
    chunks_sent: int = 0
    links: int = 0
    waiting: int = 0
    refused: int = 0


@attrs.define
class ServeContext:
    device_id: str
    #: the root's timestamp keys: the only keys a peer token may be signed by.
    trust: Callable[[], TrustRoot | None]
    #: (app, version) -> what this device holds of it, or None.
    holdings: Callable[[str, str], Held | None]
    #: wall-clock seconds (token expiry).
    now: Callable[[], float]
    #: True while the device's own app reports activity (the activity gate).
    busy: Callable[[], bool] = lambda: False
    max_peers: int = 4
    #: links that may wait for a slot; more are closed at once.
    max_waiting: int = 16
    #: bytes/s over all links; 0: no cap.
    max_rate: float = 0.0
    heartbeat: float = 30.0
    counters: Counters = attrs.field(factory=Counters)
    slots: trio.Semaphore = attrs.field(init=False)
    _rate_start: float = 0.0
    _rate_sent: int = 0

    def __attrs_post_init__(self) -> None:
        self.slots = trio.Semaphore(self.max_peers)

    async def pace(self, nbytes: int) -> None:
        """Sleep so that uploads average at most ``max_rate`` bytes/s."""
        if not self.max_rate:
            return
        now = trio.current_time()
        if self._rate_sent == 0 or now - self._rate_start > 10.0:
            self._rate_start, self._rate_sent = now, 0
        self._rate_sent += nbytes
        ahead = self._rate_start + self._rate_sent / self.max_rate - now
        if ahead > 0:
            await trio.sleep(ahead)


def _refused(code: ErrorCode, message: str) -> RpcError:
    return RpcError(int(code), message)


class _Link:
    """One asking device's link: its handshake facts and its verified token."""

    def __init__(self, ctx: ServeContext) -> None:
        self.ctx = ctx
        self.cid = secrets.token_hex(8)
        self.nonce = secrets.token_bytes(32)
        self.hello: Hello | None = None
        self.authed = False
        self.token: PeerToken | None = None
        self.held: Held | None = None

    async def on_request(self, peer: Peer, event: RequestReceived) -> None:
        method, params = event.method, event.params
        if method == "hello" and isinstance(params, Hello):
            await self._hello(peer, event.id, params)
        elif method == "auth" and isinstance(params, Auth):
            await self._auth(peer, event.id, params)
        elif method == "ping":
            await peer.respond(event.id, params)
        elif method == "present_token" and isinstance(params, PresentToken):
            self._present(params)
            await peer.respond(event.id, Empty())
        elif method == "get_manifest" and isinstance(params, GetManifest):
            held = self._release(params.app, params.version)
            await peer.respond(event.id, GetManifestResult(manifest=held.signed, status="active"))
        elif method == "get_chunks" and isinstance(params, GetChunks):
            await self._chunks(peer, event.id, params)
        else:
            raise _refused(ErrorCode.METHOD_NOT_FOUND, f"{method} is not served on a peer link")

    async def _refuse(self, peer: Peer, rid: int, refusal: Refusal) -> None:
        self.ctx.counters.refused += 1
        try:
            await peer.respond_error(rid, refusal.code, refusal.reason)
        finally:
            await peer.close(refusal.close, refusal.reason)

    async def _hello(self, peer: Peer, rid: int, hello: Hello) -> None:
        outcome = check_hello(hello)
        if isinstance(outcome, AcceptedHello) and hello.role != "device":
            outcome = Refusal(
                code=ErrorCode.AUTH_FAILED,
                reason="only devices may ask a peer",
                close=CloseCode.AUTH_FAILED,
            )
        if isinstance(outcome, Refusal):
            await self._refuse(peer, rid, outcome)
            return
        self.hello = hello
        await peer.respond(
            rid,
            HelloResult(
                protocol_version=PROTOCOL_VERSION,
                server_id=self.ctx.device_id,
                cid=self.cid,
                heartbeat=self.ctx.heartbeat,
                nonce=self.nonce,
            ),
        )

    async def _auth(self, peer: Peer, rid: int, auth: Auth) -> None:
        assert self.hello is not None  # the state machine allows auth only after hello
        outcome = check_auth(
            self.hello,
            auth,
            server_id=self.ctx.device_id,
            cid=self.cid,
            nonce=self.nonce,
            operator_keys=(),
        )
        if isinstance(outcome, Refusal):
            await self._refuse(peer, rid, outcome)
            return
        self.authed = True
        await peer.respond(rid, AuthResult(status="accepted"))

    def _present(self, params: PresentToken) -> None:
        assert self.hello is not None and self.authed
        trust = self.ctx.trust()
        if trust is None:
            raise _refused(ErrorCode.FORBIDDEN, "this device trusts no timestamp key")
        try:
            token = verify_peer_token(
                trust,
                params.token,
                me=self.ctx.device_id,
                asker=self.hello.peer_id,
                asker_key=self.hello.public_key,
                app=params.app,
                version=params.version,
                now=self.ctx.now(),
            )
        except FleetpushError as e:
            self.ctx.counters.refused += 1
            raise _refused(ErrorCode.FORBIDDEN, f"peer token refused: {e}") from e
        self.token = token

    def _release(self, app: str, version: str) -> Held:
        t = self.token
        if t is None:
            raise _refused(ErrorCode.FORBIDDEN, "present a peer token first")
        if (app, version) != (t.app, t.version):
            raise _refused(ErrorCode.FORBIDDEN, f"the peer token is for {t.app} {t.version}")
        if self.held is None:
            self.held = self.ctx.holdings(app, version)
        if self.held is None:
            raise _refused(ErrorCode.NOT_FOUND, f"this device does not hold {app} {version}")
        return self.held

    async def _chunks(self, peer: Peer, rid: int, params: GetChunks) -> None:
        held = self._release(params.app, params.version)
        if self.ctx.busy():
            raise _refused(ErrorCode.BUSY, "busy: the device's app is active")
        m = held.manifest
        for file, chunk in params.chunks:
            if file >= len(m.files) or chunk >= len(m.files[file].chunks):
                raise _refused(ErrorCode.INVALID_PARAMS, f"no chunk {chunk} of file {file}")
        # The core checks each DATA frame against what was asked (§7.8).
        peer.conn.start_chunks(rid, list(params.chunks))
        sent = 0
        for file, chunk in params.chunks:
            entry = m.files[file]
            offset, length = spans(entry, m.chunk_size)[chunk]
            data = await trio.to_thread.run_sync(_read, held.files_dir / entry.path, offset, length)
            await self.ctx.pace(len(data))
            await peer.send_chunk(rid, file, chunk, data)
            sent += 1
            self.ctx.counters.bytes_sent += len(data)
            self.ctx.counters.chunks_sent += 1
        await peer.respond(rid, GetChunksResult(sent=sent))


def _read(path: Path, offset: int, length: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        raise _refused(ErrorCode.UNAVAILABLE, f"cannot read {path.name}: {e.strerror}") from e
    if len(data) != length:
        raise _refused(ErrorCode.UNAVAILABLE, f"{path.name} is shorter than its manifest says")
    return data


async def serve_link(ctx: ServeContext, stream: trio.abc.Stream) -> None:
    """Serve one asking device until it leaves; every failure stays in this link."""
    # Beyond max_peers a link waits (unanswered) for a slot: the asker's own
    # handshake deadline bounds the wait, after which it moves on to another
    # peer or the releaser. Beyond max_waiting it is closed at once.
    if ctx.counters.waiting >= ctx.max_waiting:
        ctx.counters.refused += 1
        await stream.aclose()
        return
    ctx.counters.waiting += 1
    try:
        await ctx.slots.acquire()
    finally:
        ctx.counters.waiting -= 1
    ctx.counters.links += 1
    link = _Link(ctx)
    conn = Connection(Side.SERVER, now=trio.current_time(), heartbeat=ctx.heartbeat)
    try:
        async with open_peer(stream, conn, name="p2p", on_request=link.on_request) as peer:
            await peer.wait_closed()
    except (FleetpushError, OSError, trio.BrokenResourceError) as e:
        log.info("peer link ended: %s", e)
    finally:
        ctx.counters.links -= 1
        ctx.slots.release()


async def serve_peers(
    ctx: ServeContext,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0: any free port) and serve peers; reports the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        await serve_link(ctx, stream)

    await trio.serve_listeners(handle, listeners)


__all__ = ["Counters", "Held", "ServeContext", "serve_link", "serve_peers"]
