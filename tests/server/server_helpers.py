"""A minimal device and operator built on fleetpush.net.peer, and the suite's publish.

The real updater lives in fleetpush.client; these helpers only speak the
protocol, so the server's tests do not depend on it. The releaser in a
nursery, release trees and keys are in tests/support (fp_releaser, fp_trees).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION, Manifest
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import (
    Ack,
    GetChunks,
    GetManifest,
    Hello,
    UpdateCommand,
)
from fp_releaser import publish as fp_publish
from fp_trees import release_tree

from fleetpush.net.dial import dial, single_exception
from fleetpush.net.peer import Peer

#: Timeouts short enough for tests, long enough for a loaded CI box.
FAST = dict(
    heartbeat=5.0, handshake_timeout=2.0, frame_timeout=1.0, send_timeout=2.0, grace_period=2.0
)


def publish(
    data_dir: Path,
    tmp_path: Path,
    version: str,
    files: dict[str, bytes] | None = None,
    *,
    app: str = "demo",
    key: Ed25519PrivateKey | None = None,
    **kw: Any,
) -> Any:
    """Publish ``files`` (default: one small app.txt) as ``version``, signed by ``key`` or unsigned.

    Returns publish_release's result; raises what it raises.
    """
    src = release_tree(tmp_path, app, version, files)
    return fp_publish(data_dir, src, version, app=app, keys=[key] if key else [], **kw)


class Device:
    """A test device: connects, authenticates, records commands, downloads."""

    def __init__(self, peer: Peer, status: str, device_id: str) -> None:
        self.peer = peer
        self.status = status
        self.device_id = device_id
        self.commands: list[tuple[str, UpdateCommand]] = []
        self.command_received = trio.Event()

    async def request(self, method: str, params: object, timeout: float = 5.0) -> Any:
        return await self.peer.request(method, params, timeout=timeout)

    async def download(self, app: str, version: str) -> dict[str, bytes]:
        """Fetch every file of a release chunk by chunk, verifying digests like a client."""
        result = await self.request("get_manifest", GetManifest(app=app, version=version))
        manifest = Manifest.from_bytes(result.manifest.signed)
        wanted = [(i, c) for i, f in enumerate(manifest.files) for c in range(len(f.chunks))]
        parts: dict[tuple[int, int], bytes] = {}
        for start in range(0, len(wanted), 32):
            batch = wanted[start : start + 32]
            stream, done = await self.peer.request_chunks(
                GetChunks(app=app, version=version, chunks=batch)
            )
            async for chunk in stream:
                data = bytes(chunk.payload)
                expected = manifest.files[chunk.file].chunks[chunk.chunk]
                assert hashlib.sha256(data).digest() == expected
                parts[(chunk.file, chunk.chunk)] = data
            await done()
        out = {}
        for i, f in enumerate(manifest.files):
            data = b"".join(parts[(i, c)] for c in range(len(f.chunks)))
            assert hashlib.sha256(data).digest() == f.digest
            out[f.path] = data
        return out


@asynccontextmanager
async def connect(
    port: int,
    key: Ed25519PrivateKey | None = None,
    *,
    role: str = "device",
    peer_id: str = "dev-1",
    app: str | None = "demo",
    version: str | None = "1.0",
    channel: str = "stable",
    sequence: int = 0,
    group: str | None = None,
    protocol_version: str = PROTOCOL_VERSION,
    ack: Callable[[UpdateCommand], Ack] | None = None,
    capabilities: list[str] | None = None,
) -> AsyncIterator[Device]:
    key = key or Ed25519PrivateKey.generate()
    device: Device | None = None

    async def on_request(peer: Peer, ev: RequestReceived) -> None:
        assert device is not None
        device.commands.append((ev.method, ev.params))
        device.command_received.set()
        device.command_received = trio.Event()
        answer = ack(ev.params) if ack else Ack(accepted=True)
        await peer.respond(ev.id, answer)

    hello = Hello(
        protocol_version=protocol_version,
        role=role,
        peer_id=peer_id,
        public_key=public_bytes(key),
        app=app if role == "device" else None,
        version=version if role == "device" else None,
        channel=channel if role == "device" else None,
        sequence=sequence,
        group=group,
        capabilities=capabilities or [],
    )
    try:
        async with dial(
            ("127.0.0.1", port),
            key,
            hello,
            timeout=5,
            heartbeat=5.0,
            on_request=on_request,
            name=f"test-{peer_id}",
        ) as link:
            device = Device(link.peer, link.auth.status, peer_id)
            yield device
    except BaseExceptionGroup as nursery_group:
        # the body's own error, for readable pytest.raises
        raise (single_exception(nursery_group) or nursery_group) from nursery_group


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
