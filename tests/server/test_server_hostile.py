"""Hostile peers each get their error while an honest download completes correctly."""

from __future__ import annotations

import hashlib
import os
import struct

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    Connection,
    ConnectionClosed,
    ResponseReceived,
    Side,
    auth_payload,
    sign_challenge,
)
from fleetpush.protocol.frames import HEADER, FrameType
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Auth, GetChunks, Hello
from fp_releaser import running_releaser
from server_helpers import connect, publish, wait_for


async def bye_code(stream: trio.SocketStream, timeout: float = 5.0) -> int | None:
    """Read until the server's bye (its close code) or EOF (None)."""
    conn = Connection(Side.CLIENT, now=trio.current_time())
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            conn.receive_data(data, trio.current_time())
            while True:
                event = conn.next_event()
                if isinstance(event, ConnectionClosed):
                    return None if not data else event.code
                if not isinstance(event, ResponseReceived):
                    break
            if not data:
                return None


async def raw(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def malformed(port: int, results: dict[str, object]) -> None:
    async with await raw(port) as s:
        await s.send_all(b"XX\x01\x01\x00\x00\x00\x04junk")
        results["malformed"] = await bye_code(s)


async def oversize(port: int, results: dict[str, object]) -> None:
    async with await raw(port) as s:
        await s.send_all(HEADER.pack(b"FP", 1, FrameType.MESSAGE, 100 * 1024 * 1024))
        results["oversize"] = await bye_code(s)


async def drip(port: int, results: dict[str, object]) -> None:
    frame = HEADER.pack(b"FP", 1, FrameType.MESSAGE, 40) + b"\x94" + b"\x00" * 39
    async with await raw(port) as s:
        try:
            for byte in frame:
                await s.send_all(bytes([byte]))
                await trio.sleep(0.3)
        except trio.BrokenResourceError:
            pass
        results["drip"] = await bye_code(s)


async def non_reader(port: int, server, results: dict[str, object]) -> None:
    """Authenticates, asks for lots of chunks, never reads: dropped by the send deadline."""
    key = Ed25519PrivateKey.generate()
    async with await raw(port) as s:
        await _non_reader(s, server, key, results)


async def _non_reader(s, server, key, results) -> None:
    conn = Connection(Side.CLIENT, now=trio.current_time())
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id="sloth",
        public_key=public_bytes(key),
        app="demo",
        version="1.0",
        channel="stable",
    )

    async def answer() -> object:
        while True:
            conn.receive_data(await s.receive_some(65536), trio.current_time())
            event = conn.next_event()
            if isinstance(event, ResponseReceived):
                return event.result

    await s.send_all(conn.send_request("hello", hello)[1])
    hr = await answer()
    payload = auth_payload(
        server_id=hr.server_id,
        cid=hr.cid,
        nonce=hr.nonce,
        role="device",
        peer_id="sloth",
        public_key=hello.public_key,
    )
    await s.send_all(conn.send_request("auth", Auth(signature=sign_challenge(key, payload)))[1])
    await answer()
    chunks = [(0, c) for c in range(48)]  # "blob" has 49 chunks
    for _ in range(16):
        await s.send_all(
            conn.send_request("get_chunks", GetChunks(app="demo", version="2.0", chunks=chunks))[1]
        )
    await wait_for(lambda: "sloth" in server.services.fleet)
    await wait_for(lambda: "sloth" not in server.services.fleet, timeout=8)
    results["non_reader"] = "dropped"


async def flood(port: int, results: dict[str, object]) -> None:
    codes: list[int | None] = []

    async def one() -> None:
        try:
            s = await raw(port)
        except OSError:
            codes.append(None)
            return
        async with s:
            codes.append(await bye_code(s))

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(one)
    results["flood"] = codes


async def test_hostile_peers_do_not_disturb_an_honest_download(config, data_dir, tmp_path):
    config = attrs.evolve(
        config, max_connections=20, handshake_timeout=1.5, frame_timeout=0.5, send_timeout=1.0
    )
    payload = os.urandom(3 * 1024 * 1024 + 123)
    files = {"blob": payload, "cfg/x.toml": b"x = 1\n"}
    publish(data_dir, tmp_path, "2.0", files, chunk_size=65536, approved=True)
    results: dict[str, object] = {}
    with trio.fail_after(30):
        async with running_releaser(config) as handle:
            async with connect(handle.port, peer_id="honest") as dev:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(malformed, handle.port, results)
                    nursery.start_soon(oversize, handle.port, results)
                    nursery.start_soon(drip, handle.port, results)
                    nursery.start_soon(non_reader, handle.port, handle.server, results)
                    await trio.sleep(0.2)  # the hostile peers hold their slots
                    nursery.start_soon(flood, handle.port, results)
                    files = await dev.download("demo", "2.0")
                    results["honest"] = hashlib.sha256(files["blob"]).hexdigest()
                # the honest connection is still fine afterwards
                assert (await dev.download("demo", "2.0"))["cfg/x.toml"] == b"x = 1\n"
            await wait_for(lambda: not handle.server.connections, timeout=5)
    assert results["honest"] == hashlib.sha256(payload).hexdigest()
    assert results["malformed"] == CloseCode.PROTOCOL_ERROR
    assert results["oversize"] == CloseCode.FRAME_TOO_LARGE
    assert results["drip"] == CloseCode.TIMEOUT
    assert results["non_reader"] == "dropped"
    codes = results["flood"]
    assert isinstance(codes, list)
    # 20 slots: the honest device, 3 hostile ones still open or closing, the rest
    # of the flood waits for its handshake deadline; everyone else is turned away.
    assert codes.count(CloseCode.TOO_MANY_CONNECTIONS) >= 20
    assert set(codes) <= {CloseCode.TOO_MANY_CONNECTIONS, CloseCode.TIMEOUT}


def test_header_struct_matches_frames_module():
    assert HEADER.size == 8 and struct.calcsize(">2sBBI") == 8
