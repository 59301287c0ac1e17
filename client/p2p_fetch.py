"""Fetch a release's missing chunks from near peers before the releaser (§7.11).

A pre-pass of the download (client/download.py): it writes every chunk a
peer delivers *and* that matches its digest in the verified manifest into
the staging files, at the offset the manifest gives it. The ordinary download
then runs as a resume: its planner re-verifies what is staged and asks the
releaser only for the rest. So the releaser is the fallback for every chunk
no peer delivered, whatever the reason, and every existing refusal of the
releaser path still applies to what it fetches. (Re-verifying peer chunks
costs one extra hash pass over them; it keeps the fallback rule in one place.)

The choices (which peer, deadlines, drops) are :class:`FetchPolicy`'s
(protocol/p2p_policy.py); this module only runs the links. A peer that sends
a chunk failing its digest is dropped for the release and reported through
``report`` (the releaser stops handing it out); one that refuses or fails is
dropped for this pass; one that misses its deadlines is replaced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import Connection, Side
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.frames import PROTOCOL_VERSION
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import GetChunks, Hello, SignedManifest
from fleetpush.protocol.p2p import PeerAddr, PresentToken
from fleetpush.protocol.p2p_policy import RELEASER, FetchPolicy, chunk_deadline

from fleetpush.net.peer import Peer, client_handshake, open_peer

from .download_plan import open_staged, pwrite_all, spans

log = logging.getLogger("fleetpush.client.p2p")

#: Chunks asked of one peer per request.
PER_PEER = 8


@attrs.define
class PeerFetchResult:
    bytes_from_peers: int = 0
    #: peer id -> why it was dropped ("corrupt", "slow", "gone").
    dropped: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class _Dials:
    left: int
    changed: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen
class FetchContext:
    device_id: str
    key: Ed25519PrivateKey
    #: called once per peer caught sending a corrupt chunk (report_peer).
    report: Callable[[str, str], Awaitable[None]]
    #: how long a peer has to accept, authenticate and take the token.
    connect_timeout: float = 5.0


def all_chunks(manifest: Manifest) -> dict[Hashable, int]:
    """Every (file, chunk) of ``manifest`` with its size: what a fresh device lacks."""
    return {
        (fi, ci): length
        for fi, entry in enumerate(manifest.files)
        for ci, (_, length) in enumerate(spans(entry, manifest.chunk_size))
    }


async def _open(
    ctx: FetchContext,
    addr: PeerAddr,
    *,
    app: str,
    version: str,
    token: SignedManifest,
    stack: list[Peer],
    ready: trio.Event,
) -> None:
    """Connect, authenticate and present the token; keep the link open until cancelled."""
    with trio.move_on_after(ctx.connect_timeout) as scope:
        stream = await trio.open_tcp_stream(addr.host, addr.port)
    if scope.cancelled_caught:
        raise trio.TooSlowError
    conn = Connection(Side.CLIENT, now=trio.current_time(), heartbeat=30.0)
    async with open_peer(stream, conn, name=f"p2p:{addr.device_id}") as peer:
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=ctx.device_id,
            public_key=public_bytes(ctx.key),
            app=app,
            version=version,
        )
        # Failures are handled here: raised out of open_peer's nursery they
        # would arrive wrapped in an exception group.
        try:
            await client_handshake(peer, ctx.key, hello, timeout=ctx.connect_timeout)
            with trio.fail_after(ctx.connect_timeout):
                await peer.request(
                    "present_token", PresentToken(app=app, version=version, token=token)
                )
        except (FleetpushError, trio.TooSlowError) as e:
            log.info("peer %s refused or did not answer: %s", addr.device_id, e)
            return
        peer.name = addr.device_id
        stack.append(peer)
        ready.set()
        await trio.sleep_forever()


async def fetch_from_peers(
    ctx: FetchContext,
    peers: list[PeerAddr],
    *,
    token: SignedManifest,
    manifest: Manifest,
    files_dir: Path,
    missing: dict[Hashable, int],
) -> PeerFetchResult:
    """Fill as many of ``missing`` ((file, chunk) -> size) as peers deliver.

    Never raises for a peer's failure; raises :class:`FleetpushError` only
    for this device's own file errors (the caller treats the pass as best effort).
    """
    result = PeerFetchResult()
    if not peers or not missing:
        return result
    files_dir.mkdir(parents=True, exist_ok=True)
    # Peers join the plan as their handshake completes: a slow or silent one
    # never holds up the others (nor their upload slots).
    policy = FetchPolicy(chunks=dict(missing), peers=[])
    links: dict[str, Peer] = {}
    dials = _Dials(left=len(peers))
    fds: dict[int, int] = {}

    async def connect(addr: PeerAddr, nursery: trio.Nursery) -> None:
        got: list[Peer] = []
        ready = trio.Event()

        async def run() -> None:
            try:
                await _open(
                    ctx,
                    addr,
                    app=manifest.app,
                    version=manifest.version,
                    token=token,
                    stack=got,
                    ready=ready,
                )
            except (FleetpushError, OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
                log.info("peer %s unusable: %s", addr.device_id, e)
            finally:
                ready.set()

        nursery.start_soon(run)
        await ready.wait()
        if got:
            links[addr.device_id] = got[0]
            policy.peers.append(addr.device_id)
        else:
            policy.gone(addr.device_id)
        dials.left -= 1
        dials.changed.set()

    def write(file: int, chunk: int, payload: memoryview | bytes) -> bool:
        entry = manifest.files[file]
        offset, length = spans(entry, manifest.chunk_size)[chunk]
        if len(payload) != length or digest(manifest.hash, payload) != entry.chunks[chunk]:
            return False
        if file not in fds:
            fds[file], _ = open_staged(files_dir, entry.path)
        pwrite_all(fds[file], payload, offset)
        return True

    async def ask(peer_id: str, keys: list[Hashable]) -> None:
        link = links.get(peer_id)
        if link is None:
            policy.gone(peer_id)
            return
        pairs = [k for k in keys if isinstance(k, tuple)]
        deadline = sum(chunk_deadline(missing[k]) for k in keys)
        params = GetChunks(app=manifest.app, version=manifest.version, chunks=pairs)
        with trio.move_on_after(deadline):
            try:
                stream, answer = await link.request_chunks(params, buffer=4)
                try:
                    async for c in stream:
                        key = (c.file, c.chunk)
                        if c.compressed or key not in missing:
                            ok = False
                        else:
                            ok = await trio.to_thread.run_sync(write, c.file, c.chunk, c.payload)
                        if not ok:
                            policy.corrupt(key, peer_id)
                            await link.close()
                            await ctx.report(peer_id, "corrupt")
                            return
                        policy.received(key, peer_id)
                    await answer()  # the stream ended: the response is in
                finally:
                    stream.close()
            except (FleetpushError, OSError, trio.TooSlowError) as e:
                log.info("peer %s failed: %s", peer_id, e)
                policy.gone(peer_id)
                return

    try:
        async with trio.open_nursery() as nursery:
            for addr in peers:
                nursery.start_soon(connect, addr, nursery)
            while True:
                if not policy.live_peers:
                    if not dials.left:
                        break
                    await dials.changed.wait()
                    dials.changed = trio.Event()
                    continue
                plan = policy.assign(trio.current_time(), per_peer=PER_PEER)
                plan.pop(RELEASER, None)  # left missing: the download fetches them
                if not plan:
                    break
                async with trio.open_nursery() as asking:
                    for peer_id, keys in plan.items():
                        asking.start_soon(ask, peer_id, keys)
                policy.expire(trio.current_time())
            nursery.cancel_scope.cancel()
    finally:
        for fd in fds.values():
            os.close(fd)
    result.bytes_from_peers = policy.bytes_from_peers
    result.dropped = dict(policy.dropped)
    return result


__all__ = ["FetchContext", "PeerFetchResult", "all_chunks", "fetch_from_peers"]
