"""The download session refuses what a malicious releaser or relay sends (issue 6).

A releaser built here on fleetpush.net.peer serves a correctly signed manifest,
then misbehaves while answering ``get_chunks``. The device side is the real
downloader (fleetpush.client.download). Each misbehaviour must be refused,
nothing unverified may end up staged, and the install engine must refuse to
apply what is not completely verified.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client.download import DownloadError, download
from fleetpush.client.errors import UpdaterError
from fleetpush.client.install import apply_staged
from fleetpush.client.layout import StateLayout
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    Connection,
    FleetpushError,
    IntegrityError,
    RemoteProtocolError,
    Side,
    State,
)
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.frames import encode_data_frame_header
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.manifest import FileEntry, Manifest, sign_manifest
from fleetpush.protocol.messages import (
    AuthResult,
    GetChunks,
    GetChunksResult,
    Hello,
    HelloResult,
    SignedManifest,
)
from fp_keys import DEVICE_KEY, RELEASE_KEY
from fp_releaser import publish, releaser
from fp_trees import noise
from hostile_proto import handshaken_pair, pump

from fleetpush.net.dial import dial
from fleetpush.net.peer import Peer, open_peer

CHUNK = 16 * 1024


def release(version: str, size: int = 5 * CHUNK + 100) -> tuple[SignedManifest, Manifest, bytes]:
    data = b"".join(noise(hashlib.sha256(version.encode()).digest(), size // 32 * 32))
    chunks = [digest("sha256", data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
    entry = FileEntry(
        path="blob.bin", size=len(data), mode=0o644, digest=digest("sha256", data), chunks=chunks
    )
    m = Manifest(
        app="dl", version=version, sequence=2, created=int(time.time()), chunk_size=CHUNK,
        files=[entry],
    )  # fmt: skip
    return sign_manifest(m.to_bytes(), [RELEASE_KEY]), m, data


#: misbehaviour(peer, rid, chunks, data, other) -> sends DATA frames for one get_chunks
Misbehaviour = Callable[[Peer, int, list[tuple[int, int]], bytes, bytes], Any]


async def _raw_chunk(peer: Peer, stream: int, file: int, chunk: int, payload: bytes) -> None:
    """A DATA frame written straight to the socket: what a hostile releaser can do."""
    await peer.stream.send_all(
        encode_data_frame_header(stream, file, chunk, len(payload)) + payload
    )


def _piece(data: bytes, chunk: int) -> bytes:
    return data[chunk * CHUNK : (chunk + 1) * CHUNK]


async def unsolicited(peer: Peer, rid: int, chunks: Any, data: bytes, other: bytes) -> None:
    await _raw_chunk(peer, rid + 1000, 0, 0, _piece(data, 0))


async def duplicate(peer: Peer, rid: int, chunks: Any, data: bytes, other: bytes) -> None:
    _, c = chunks[0]
    await _raw_chunk(peer, rid, 0, c, _piece(data, c))
    await _raw_chunk(peer, rid, 0, c, _piece(data, c))


async def out_of_range(peer: Peer, rid: int, chunks: Any, data: bytes, other: bytes) -> None:
    await _raw_chunk(peer, rid, 0, 99, _piece(data, 0))


async def other_release(peer: Peer, rid: int, chunks: Any, data: bytes, other: bytes) -> None:
    for f, c in chunks:
        await _raw_chunk(peer, rid, f, c, _piece(other, c))


async def too_long(peer: Peer, rid: int, chunks: Any, data: bytes, other: bytes) -> None:
    for f, c in chunks:
        await _raw_chunk(peer, rid, f, c, _piece(data, c) + b"\0" * 100)


async def truncated_last(peer: Peer, rid: int, chunks: Any, data: bytes, other: bytes) -> None:
    for f, c in chunks:
        await _raw_chunk(peer, rid, f, c, _piece(data, c)[:-1])


@asynccontextmanager
async def hostile_releaser(
    signed: SignedManifest, data: bytes, other: bytes, misbehave: Misbehaviour
) -> AsyncIterator[int]:
    async def handle(stream: trio.SocketStream) -> None:
        conn = Connection(Side.SERVER, now=trio.current_time())

        async def on_request(peer: Peer, ev: RequestReceived) -> None:
            if ev.method == "hello":
                result = HelloResult(
                    protocol_version=PROTOCOL_VERSION, server_id="evil", cid="c",
                    heartbeat=15.0, nonce=secrets.token_bytes(32),
                )  # fmt: skip
                await peer.respond(ev.id, result)
            elif ev.method == "auth":
                await peer.respond(ev.id, AuthResult(status="accepted"))
            elif ev.method == "get_chunks":
                assert isinstance(ev.params, GetChunks)
                chunks = list(ev.params.chunks)
                try:
                    await misbehave(peer, ev.id, chunks, data, other)
                    conn.start_chunks(ev.id, chunks)  # pretend it was all sent
                    conn._theirs[ev.id].chunks = None
                    await peer.respond(ev.id, GetChunksResult(sent=len(chunks)))
                except FleetpushError:
                    pass

        async with open_peer(stream, conn, name="evil", on_request=on_request) as peer:
            await peer.wait_closed()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def _download_from(port: int, signed: SignedManifest, m: Manifest, tmp: Path) -> Any:
    key = DEVICE_KEY
    hello = Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id="victim",
        public_key=public_bytes(key), app="dl", version="1.0.0",
    )  # fmt: skip
    async with dial(("127.0.0.1", port), key, hello, timeout=5, name="victim") as link:
        (tmp / "app").mkdir(exist_ok=True)
        return await download(
            link.peer, signed, m, StateLayout.of(tmp / "state"), tmp / "app",
            window=4, chunks_per_request=2, request_timeout=5,
        )  # fmt: skip


REFUSALS = {
    "a chunk on a stream nobody asked for (no manifest, no request)": (unsolicited, DownloadError),
    "the same chunk twice": (duplicate, DownloadError),
    "a chunk index outside the request (and the file)": (out_of_range, DownloadError),
    "chunks of another release (same sizes, different bytes)": (other_release, IntegrityError),
    "more bytes than the signed chunk length": (too_long, IntegrityError),
    "fewer bytes than the signed chunk length": (truncated_last, IntegrityError),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
async def test_download_refuses(case: str, tmp_path: Path) -> None:
    misbehave, error = REFUSALS[case]
    signed, m, data = release("2.0.0")
    _, _, other = release("3.0.0")
    with trio.fail_after(20):
        async with hostile_releaser(signed, data, other, misbehave) as port:
            with pytest.raises((error, ExceptionGroup)) as raised:
                await _download_from(port, signed, m, tmp_path)
    exc = raised.value
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    assert isinstance(exc, error), repr(exc)
    # Nothing unverified is staged: every byte on disk matches a signed chunk digest.
    staged = StateLayout.of(tmp_path / "state").staged_files("2.0.0") / "blob.bin"
    if staged.exists():
        content = staged.read_bytes()
        for i, want in enumerate(m.files[0].chunks):
            piece = content[i * CHUNK : (i + 1) * CHUNK]
            assert piece.strip(b"\0") == b"" or digest("sha256", piece) == want, f"chunk {i}"
    # ... and none of it can be applied.
    with pytest.raises(UpdaterError):
        apply_staged(tmp_path / "state", tmp_path / "app", "2.0.0", time.time(), signed=signed)
    assert not list((tmp_path / "app").iterdir())


def test_data_frame_before_the_handshake_is_refused() -> None:
    """Sans-IO: a DATA frame before auth (so before any manifest or request) is a protocol error."""
    client = Connection(Side.CLIENT, now=0.0)
    client.send_request("hello", Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id="d",
        public_key=b"\x01" * 32,
    ))  # fmt: skip
    client.receive_data(encode_data_frame_header(1, 0, 0, 4) + b"abcd", 0.0)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.state is State.AWAIT_HELLO_RESULT


def test_data_frame_after_the_request_was_answered_is_refused() -> None:
    client, server = handshaken_pair()
    rid, data = client.send_request("get_chunks", GetChunks(app="a", version="1", chunks=[(0, 0)]))
    (ev,) = pump(client, server, data)
    server.start_chunks(ev.id, [(0, 0)])
    wire = server.send_chunk_header(ev.id, 0, 0, 3) + b"abc"
    wire += server.send_response(ev.id, GetChunksResult(sent=1))
    pump(server, client, wire)
    client.receive_data(encode_data_frame_header(rid, 0, 0, 3) + b"abc", 0.0)
    with pytest.raises(RemoteProtocolError):
        client.next_event()


async def test_releaser_refuses_out_of_range_and_foreign_chunk_requests(tmp_path: Path) -> None:
    """The real releaser answers a bad get_chunks with an error and keeps the session."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 40_000)
    publish(tmp_path / "data", src, "2.0.0", app="dl", approved=True)
    key = DEVICE_KEY
    with trio.fail_after(20):
        async with releaser(tmp_path / "data") as handle:
            hello = Hello(
                protocol_version=PROTOCOL_VERSION, role="device", peer_id="dev",
                public_key=public_bytes(key), app="dl", version="1.0.0",
            )  # fmt: skip
            async with dial(("127.0.0.1", handle.port), key, hello, timeout=5, name="dev") as link:
                peer = link.peer
                for bad in (
                    GetChunks(app="dl", version="2.0.0", chunks=[(0, 999)]),
                    GetChunks(app="dl", version="2.0.0", chunks=[(7, 0)]),
                    GetChunks(app="dl", version="9.9.9", chunks=[(0, 0)]),
                    GetChunks(app="other", version="2.0.0", chunks=[(0, 0)]),
                ):
                    chunks, done = await peer.request_chunks(bad)
                    got = [c async for c in chunks]
                    with pytest.raises(FleetpushError):
                        await done()
                    assert got == []
                # The session is still good for a correct request.
                chunks, done = await peer.request_chunks(
                    GetChunks(app="dl", version="2.0.0", chunks=[(0, 0)])
                )
                assert len([c async for c in chunks]) == 1
                await done()
