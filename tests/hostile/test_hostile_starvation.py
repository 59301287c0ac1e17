"""Strangers who ask and never read: chunk askers and watchers (issue 10, items 5 and 6).

Each test runs a real releaser on 127.0.0.1 and asserts on the releaser's own
counters (the chunk cache's pinned bytes, the event hub's watchers and queued
bytes), not on timing; ``fail_after`` is only a guard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Manifest,
    ResponseReceived,
    Side,
    auth_payload,
    sign_challenge,
)
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import AppStatus, Auth, GetChunks, GetManifest, Hello, Watch
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser
from fp_trees import release_tree
from hostile_fleet import APP, publish_approved
from hostile_peers import hello, raw_handshake

from fleetpush.net.dial import dial

VERSION = "3.0.0"
#: what the non-readers ask for: another release, so the honest device's
#: chunks are never cache hits on theirs and it needs room of its own.
OTHER = "2.9.0"
MIB = 1024 * 1024


async def _download(port: int) -> bytes:
    """An honest device: fetch the whole release, reading everything, and verify it."""
    key = Ed25519PrivateKey.generate()
    async with dial(("127.0.0.1", port), key, hello(key, "honest"), timeout=10) as link:
        peer = link.peer
        result = await peer.request(
            "get_manifest", GetManifest(app=APP, version=VERSION), timeout=10
        )
        manifest = Manifest.from_bytes(result.manifest.signed)
        (entry,) = manifest.files
        parts: list[bytes] = []
        wanted = [(0, c) for c in range(len(entry.chunks))]
        for start in range(0, len(wanted), 4):
            stream, done = await peer.request_chunks(
                GetChunks(app=APP, version=VERSION, chunks=wanted[start : start + 4])
            )
            async for chunk in stream:
                parts.append(bytes(chunk.payload))
            await done()
        data = b"".join(parts)
        assert hashlib.sha256(data).digest() == entry.digest
        return data


async def _non_reader(port: int, index: int, held: list[trio.SocketStream]) -> None:
    """Authenticate, ask for the whole release three times, never read a byte.

    Each starts at another chunk, so they stall with different chunks pinned.
    """
    stream, conn = await raw_handshake(port, "nonreader")
    held.append(stream)
    chunks = [(0, (c + 5 * index) % 16) for c in range(16)]
    for _ in range(3):
        _, data = conn.send_request("get_chunks", GetChunks(app=APP, version=OTHER, chunks=chunks))
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            return


async def test_non_readers_cannot_starve_an_honest_download(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    payload = os.urandom(16 * MIB)
    publish_approved(data_dir, release_tree(tmp_path, APP, VERSION, {"blob": payload}), VERSION)
    other = release_tree(tmp_path, APP, OTHER, {"blob": os.urandom(16 * MIB)})
    publish_approved(data_dir, other, OTHER)
    # The send deadline (30 s) is far past the guard: before the fair shares,
    # the honest download waited for the non-readers' pins until it passed.
    with trio.fail_after(25):
        async with releaser(
            data_dir,
            chunk_cache_bytes=8 * MIB,
            send_timeout=30.0,
            chunk_stall_timeout=0.5,
            max_handshaking_per_source=64,
        ) as handle:
            cache = handle.services.cache
            held: list[trio.SocketStream] = []
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(_non_reader, handle.port, i, held)
            # Let them fill their socket buffers and stall with chunks pinned.
            with trio.move_on_after(3):
                while cache.pinned_bytes * 2 <= cache.max_bytes:
                    await trio.sleep(0.05)
            assert await _download(handle.port) == payload
            assert cache.reclaimed >= 1, "no stalled non-reader was closed"
            assert cache.peak_pinned <= cache.max_bytes
            for stream in held:
                await trio.aclose_forcefully(stream)
            while cache.pinned_bytes:
                await trio.sleep(0.05)


async def _raw_operator(port: int) -> tuple[trio.SocketStream, Connection]:
    """An authenticated operator over a bare socket; nothing reads after the handshake."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = Connection(Side.CLIENT, now=trio.current_time())
    h = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="operator",
        peer_id="watcher",
        public_key=public_bytes(OPERATOR_KEY),
    )

    async def answer() -> Any:
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data = await stream.receive_some(65536)
                assert data, "closed during the handshake"
                conn.receive_data(data, trio.current_time())
            elif isinstance(ev, ResponseReceived):
                return ev.result

    with trio.fail_after(10):
        await stream.send_all(conn.send_request("hello", h)[1])
        result = await answer()
        payload = auth_payload(
            server_id=result.server_id, cid=result.cid, nonce=result.nonce,
            role="operator", peer_id=h.peer_id, public_key=h.public_key,
        )  # fmt: skip
        auth = Auth(signature=sign_challenge(OPERATOR_KEY, payload))
        await stream.send_all(conn.send_request("auth", auth)[1])
        await answer()
    return stream, conn


async def _chatty_device(port: int, count: int) -> None:
    """A device sending ``count`` app_status notifications with ~60 KB errors each."""
    key = Ed25519PrivateKey.generate()
    async with dial(("127.0.0.1", port), key, hello(key, "chatty"), timeout=10) as link:
        for i in range(count):
            await link.peer.notify(
                "app_status",
                AppStatus(state="error", pid=1, uptime=1.0, exit_code=1, error="x" * 60_000),
            )
            if i % 16 == 0:
                await trio.sleep(0)


async def test_a_non_reading_watcher_holds_at_most_its_byte_bound(tmp_path: Path) -> None:
    bound = 256 * 1024
    with trio.fail_after(30):
        async with releaser(
            tmp_path / "data", watch_queue_bytes=bound, watch_queue=100_000, send_timeout=30.0
        ) as handle:
            hub = handle.services.events
            stream, conn = await _raw_operator(handle.port)
            async with stream:
                await stream.send_all(conn.send_request("watch", Watch(history=0))[1])
                await _wait(lambda: hub.watchers == 1)
                await _chatty_device(handle.port, 600)
                # 600 events of ~60 KB (36 MB) were offered to a watcher that
                # reads nothing: what it holds stays under its bound.
                assert 0 < hub.queued_bytes <= bound
                (watcher,) = hub._watchers
                assert watcher.dropped > 0
            await _wait(lambda: hub.watchers == 0)


async def test_a_watch_dropped_before_its_answer_unsubscribes(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with releaser(tmp_path / "data") as handle:
            hub = handle.services.events
            for _ in range(5):
                stream, conn = await _raw_operator(handle.port)
                await stream.send_all(conn.send_request("watch", Watch(history=50))[1])
                await trio.aclose_forcefully(stream)  # gone before (or while) it is answered
            await _wait(lambda: not handle.server.connections)
            assert hub.watchers == 0


async def test_a_watch_dropped_while_its_queue_is_full_unsubscribes(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with releaser(tmp_path / "data", watch_queue_bytes=64 * 1024) as handle:
            hub = handle.services.events
            stream, conn = await _raw_operator(handle.port)
            await stream.send_all(conn.send_request("watch", Watch(history=0))[1])
            await _wait(lambda: hub.watchers == 1)
            await _chatty_device(handle.port, 200)  # the pump is blocked on send by now
            assert hub.watchers == 1
            await trio.aclose_forcefully(stream)
            await _wait(lambda: hub.watchers == 0)


async def test_a_watch_ends_with_the_releaser_and_unsubscribes(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with releaser(tmp_path / "data") as handle:
            hub = handle.services.events
            stream, conn = await _raw_operator(handle.port)
            await stream.send_all(conn.send_request("watch", Watch(history=0))[1])
            await _wait(lambda: hub.watchers == 1)
        # shutdown cancelled the pump (a cancelled watch)
        assert hub.watchers == 0
        await trio.aclose_forcefully(stream)


async def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
