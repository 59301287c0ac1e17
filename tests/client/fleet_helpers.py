"""Helpers of the updater/agent/download tests: signed releases, a tiny releaser, real apps.

:class:`MiniReleaser` is a minimal releaser built on fleetpush.net.peer, used where
a test needs to count or corrupt exactly what is served (download tests). The
end-to-end tests use the real ``fleetpush.server`` (tests/support/fp_releaser.py);
keys, trees and device folders are in tests/support too.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import Connection, Side, auth_payload, codec, compression, verify_challenge
from fleetpush.protocol.errors import ErrorCode
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.manifest import FileEntry, Manifest, sign_manifest
from fleetpush.protocol.messages import (
    AuthResult,
    CheckUpdate,
    CheckUpdateResult,
    GetChunks,
    GetChunksResult,
    GetManifestResult,
    HelloResult,
    SignedManifest,
    UpdateCommand,
)
from fp_keys import RELEASE_KEY

from fleetpush.net.peer import Peer, open_peer


def build_release(
    src: Path,
    *,
    app: str,
    version: str,
    sequence: int,
    chunk_size: int = 64 * 1024,
    keys: Iterable[Ed25519PrivateKey] = (RELEASE_KEY,),
    restart: bool = True,
    cdc: bool = False,
) -> tuple[SignedManifest, Manifest]:
    """Sign a manifest for the files under ``src`` (read in chunks, never whole).

    ``cdc``: cut each file into content-defined chunks (:func:`cdc_sizes`,
    at most ``chunk_size``), as a protocol 1.1 publisher does (§7.3.3).
    """
    entries = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if cdc:
            data = path.read_bytes()
            sizes = cdc_sizes(data, max_size=chunk_size)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            entries.append(
                FileEntry(
                    path=rel,
                    size=len(data),
                    mode=path.stat().st_mode & 0o755,
                    digest=digest("sha256", data),
                    chunks=[
                        digest("sha256", data[o : o + n])
                        for o, n in zip(starts, sizes, strict=True)
                    ],
                    sizes=sizes,
                )
            )
            continue
        chunks, whole = [], hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                chunks.append(digest("sha256", block))
                whole.update(block)
                size += len(block)
        entries.append(
            FileEntry(
                path=rel,
                size=size,
                mode=path.stat().st_mode & 0o755,
                digest=whole.digest(),
                chunks=chunks,
            )
        )
    m = Manifest(
        app=app,
        version=version,
        sequence=sequence,
        created=int(time.time()),
        chunk_size=chunk_size,
        files=entries,
        restart=restart,
    )
    return sign_manifest(m.to_bytes(), keys), m


_GEAR_RNG = random.Random(14)
_GEAR = [_GEAR_RNG.getrandbits(64) for _ in range(256)]


def cdc_sizes(data: bytes, *, min_size: int = 2048, mask: int = 0x1FFF, max_size: int) -> list[int]:
    """Content-defined chunk sizes of ``data`` (a gear hash, as FastCDC uses).

    Boundaries depend only on the 64 bytes before them, so after an insertion
    the chunks of the unchanged bytes that follow are cut the same again.
    Slow (pure Python): for test files of a few hundred KiB.
    """
    sizes, start, h = [], 0, 0
    for i, b in enumerate(data):
        h = ((h << 1) + _GEAR[b]) & 0xFFFFFFFFFFFFFFFF
        n = i + 1 - start
        if (n >= min_size and not h & mask) or n >= max_size:
            sizes.append(n)
            start, h = i + 1, 0
    if start < len(data):
        sizes.append(len(data) - start)
    return sizes


def raw_manifest_bytes(**fields: object) -> bytes:
    """Canonical manifest bytes without validation (to forge hostile manifests)."""
    return codec.packb(fields)


class MiniReleaser:
    """Serves releases of one app; counts and optionally corrupts chunks."""

    def __init__(self) -> None:
        self.releases: dict[str, tuple[SignedManifest, Manifest, Path]] = {}
        self.offer: str | None = None
        self.chunks_served: list[tuple[int, int]] = []
        self.tamper: set[tuple[int, int]] = set()
        self.progress: list[object] = []
        self.peers: list[Peer] = []
        self.port = 0
        self.drop_after: int | None = None  # close the connection after N chunks
        self.delay = 0.0
        #: send DATA_ZSTD where zstd saves >= 10% (compression.compress_chunk)
        self.zstd = False
        #: replaces the payload of every DATA_ZSTD frame (hostile tests): (chunk) -> payload
        self.forge_zstd: Callable[[bytes], bytes] | None = None
        self.bytes_sent = 0

    def add(self, src: Path, signed: SignedManifest, m: Manifest) -> None:
        self.releases[m.version] = (signed, m, src)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = Connection(Side.SERVER, now=trio.current_time())
        nonce = secrets.token_bytes(32)
        hello_seen: dict[str, object] = {}

        async def on_request(peer: Peer, ev: RequestReceived) -> None:
            p = ev.params
            if ev.method == "hello":
                hello_seen["hello"] = p
                await peer.respond(
                    ev.id,
                    HelloResult(
                        protocol_version="1.0",
                        server_id="mini",
                        cid="c1",
                        heartbeat=15.0,
                        nonce=nonce,
                    ),
                )
            elif ev.method == "auth":
                h = hello_seen["hello"]
                payload = auth_payload(
                    server_id="mini",
                    cid="c1",
                    nonce=nonce,
                    role=h.role,  # type: ignore[attr-defined]
                    peer_id=h.peer_id,
                    public_key=h.public_key,  # type: ignore[attr-defined]
                )
                verify_challenge(h.public_key, p.signature, payload)  # type: ignore[attr-defined]
                await peer.respond(ev.id, AuthResult(status="accepted"))
            elif ev.method == "check_update":
                assert isinstance(p, CheckUpdate)
                if self.offer is None:
                    await peer.respond(ev.id, CheckUpdateResult(available=False))
                else:
                    signed, m, _ = self.releases[self.offer]
                    await peer.respond(
                        ev.id,
                        CheckUpdateResult(
                            available=True,
                            version=m.version,
                            sequence=m.sequence,
                            manifest=signed,
                            status="approved",
                        ),
                    )
            elif ev.method == "get_manifest":
                signed, _, _ = self.releases[p.version]
                await peer.respond(ev.id, GetManifestResult(manifest=signed, status="approved"))
            elif ev.method == "get_chunks":
                assert isinstance(p, GetChunks)
                _, m, src = self.releases[p.version]
                peer.conn.start_chunks(ev.id, list(p.chunks))
                for fi, ci in p.chunks:
                    entry = m.files[fi]
                    offset, length = entry.chunk_span(m.chunk_size, ci)
                    with open(src / entry.path, "rb") as f:
                        f.seek(offset)
                        data = f.read(length)
                    if (fi, ci) in self.tamper:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    self.chunks_served.append((fi, ci))
                    if self.delay:
                        await trio.sleep(self.delay)
                    packed = compression.compress_chunk(data) if self.zstd else None
                    if packed is not None and self.forge_zstd is not None:
                        packed = self.forge_zstd(data)
                    if packed is None:
                        self.bytes_sent += len(data)
                        await peer.send_chunk(ev.id, fi, ci, data)
                    else:
                        self.bytes_sent += len(packed)
                        await peer.send_chunk(ev.id, fi, ci, packed, compressed=True)
                    if self.drop_after is not None and len(self.chunks_served) >= self.drop_after:
                        self.drop_after = None
                        await peer.close(1001, "test drop")
                        return
                await peer.respond(ev.id, GetChunksResult(sent=len(p.chunks)))
            else:
                await peer.respond_error(ev.id, ErrorCode.METHOD_NOT_FOUND, ev.method)

        async def on_notification(peer: Peer, ev: object) -> None:
            self.progress.append(ev.params)  # type: ignore[attr-defined]

        async with open_peer(
            stream, conn, name="mini", on_request=on_request, on_notification=on_notification
        ) as peer:
            self.peers.append(peer)
            await peer.wait_closed()

    async def push(self, method: str, cmd: UpdateCommand) -> object:
        peer = self.peers[-1]
        return await peer.request(method, cmd)


def chunks_valid(staged: Path, m: Manifest) -> set[tuple[int, int]]:
    """Which chunks of the staged files already match the manifest."""
    ok = set()
    for fi, entry in enumerate(m.files):
        p = staged / entry.path
        if not p.exists():
            continue
        with open(p, "rb") as f:
            for ci in range(entry.chunk_count(m.chunk_size)):
                offset, length = entry.chunk_span(m.chunk_size, ci)
                f.seek(offset)
                if digest(m.hash, f.read(length)) == entry.chunks[ci]:
                    ok.add((fi, ci))
    return ok


__all__ = [
    "InProcessHost",
    "MiniReleaser",
    "ask_version",
    "build_release",
    "cdc_sizes",
    "chunks_valid",
    "raw_manifest_bytes",
    "read_status",
]


# --- real apps (tests/apps) ------------------------------------------------------------


async def read_status(
    status_file: Path,
    version: str | None = None,
    timeout: float = 20.0,
    *,
    not_pid: int | None = None,
) -> tuple[int, str, int]:
    """Wait until STATUS_FILE names ``version`` (any if None): (port, version, pid).

    With ``not_pid``, wait for a status written by another process than that one.
    """
    with trio.fail_after(timeout):
        while True:
            try:
                port, v, pid = status_file.read_text().split()
                if (version is None or v == version) and int(pid) != not_pid:
                    return int(port), v, int(pid)
            except (FileNotFoundError, ValueError):
                pass
            await trio.sleep(0.05)


async def ask_version(port: int) -> str:
    """Ask the app itself which version it runs."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                more = await stream.receive_some(100)
                if not more:
                    break
                data += more
    return data.decode().strip()


class InProcessHost:
    """A Host for in-process Updater tests: applies with the install engine, no exec."""

    supervises = True

    def __init__(self) -> None:
        self.applied: list[str] = []

    async def apply(self, ctx, version: str) -> None:  # type: ignore[no-untyped-def]
        from fleetpush.client.install import apply_staged

        cfg = ctx.config
        await trio.to_thread.run_sync(
            lambda: apply_staged(cfg.state_dir, cfg.app_root, version, time.time())
        )
        ctx.store.reload()
        self.applied.append(version)

    async def restart_after_rollback(self, ctx) -> None:  # type: ignore[no-untyped-def]
        return None
