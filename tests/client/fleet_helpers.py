"""Helpers for the updater/agent/download tests: keys, releases, a tiny releaser.

:class:`MiniReleaser` is a minimal releaser built on fleetpush.net.peer, used where
a test needs to count or corrupt exactly what is served (download tests). The
end-to-end tests use the real ``fleetpush.server``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.client.state import DeviceState, load_state
from fleetpush.protocol import Connection, Side, auth_payload, codec, verify_challenge
from fleetpush.protocol.errors import ErrorCode
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.hashing import digest
from fleetpush.protocol.keys import private_key_from_seed, public_bytes
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
from fleetpush.server import ServerConfig, ServerHandle, publish_release, serve

from fleetpush.net.peer import Peer, open_peer
from fleetpush.operator import connect as operator_connect

RELEASE_KEY = private_key_from_seed(b"\x01" * 32)
OTHER_KEY = private_key_from_seed(b"\x02" * 32)


def key_hex(key: Ed25519PrivateKey) -> str:
    return public_bytes(key).hex()


def build_release(
    src: Path,
    *,
    app: str,
    version: str,
    sequence: int,
    chunk_size: int = 64 * 1024,
    keys: Iterable[Ed25519PrivateKey] = (RELEASE_KEY,),
    restart: bool = True,
) -> tuple[SignedManifest, Manifest]:
    """Sign a manifest for the files under ``src`` (read in chunks, never whole)."""
    entries = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        chunks, whole = [], __import__("hashlib").sha256()
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
                    with open(src / entry.path, "rb") as f:
                        f.seek(ci * m.chunk_size)
                        data = f.read(entry.chunk_length(m.chunk_size, ci))
                    if (fi, ci) in self.tamper:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    self.chunks_served.append((fi, ci))
                    if self.delay:
                        await trio.sleep(self.delay)
                    await peer.send_chunk(ev.id, fi, ci, data)
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


def make_tree(root: Path, files: dict[str, bytes | int], seed: int = 0) -> Path:
    """Write files; an int value means that many pseudo-random bytes."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(p, "wb") as f:
                left = content
                block = 0
                while left:
                    n = min(left, 1 << 20)
                    f.write(
                        (seed.to_bytes(4, "big") + block.to_bytes(4, "big")) * (n // 8)
                        + b"x" * (n % 8)
                    )
                    left -= n
                    block += 1
        else:
            p.write_bytes(content)
    return root


def chunks_valid(staged: Path, m: Manifest) -> set[tuple[int, int]]:
    """Which chunks of the staged files already match the manifest."""
    ok = set()
    for fi, entry in enumerate(m.files):
        p = staged / entry.path
        if not p.exists():
            continue
        with open(p, "rb") as f:
            for ci in range(entry.chunk_count(m.chunk_size)):
                f.seek(ci * m.chunk_size)
                if (
                    digest("sha256", f.read(entry.chunk_length(m.chunk_size, ci)))
                    == entry.chunks[ci]
                ):
                    ok.add((fi, ci))
    return ok


__all__ = [
    "OTHER_KEY",
    "RELEASE_KEY",
    "MiniReleaser",
    "build_release",
    "chunks_valid",
    "key_hex",
    "make_tree",
    "os",
]


# --- the real releaser, real apps ------------------------------------------------------

APPS = Path(__file__).resolve().parent.parent / "apps"


def app_release(tmp: Path, kind: str, version: str, behavior: str = "ok") -> Path:
    """A release directory of test app ``kind`` (embedded_app / plain_app)."""

    src = tmp / f"rel-{kind}-{version}-{behavior}"
    src.mkdir(parents=True)
    shutil.copy(APPS / kind / "app.py", src / "app.py")
    (src / "version.txt").write_text(version + "\n")
    (src / "behavior.txt").write_text(behavior + "\n")
    return src


def write_agent_toml(path: Path, **settings: object) -> Path:
    lines = []
    for k, v in settings.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list | tuple):
            lines.append(f"{k} = [{', '.join(repr(str(x)).replace(chr(39), chr(34)) for x in v)}]")
        else:
            lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


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


def device_config(tmp: Path, port: int, **overrides: object):  # type: ignore[no-untyped-def]
    from fleetpush.client import UpdaterConfig

    app_root = tmp / "app"
    app_root.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        app="demo",
        version="1.0",
        device_id="dev-1",
        state_dir=tmp / "state",
        app_root=app_root,
        server=f"127.0.0.1:{port}",
        trusted_keys=[key_hex(RELEASE_KEY)],
        auto_check=False,
        backoff_initial=0.05,
        backoff_max=0.2,
        check_timeout=5.0,
    )
    settings.update(overrides)
    return UpdaterConfig(**settings)  # type: ignore[arg-type]


@asynccontextmanager
async def running_releaser(
    tmp_path: Path, operator_key: Ed25519PrivateKey
) -> AsyncIterator[ServerHandle]:
    """A real releaser (fleetpush.server.serve) on 127.0.0.1, port 0, data in tmp_path."""
    config = ServerConfig(
        data_dir=tmp_path / "data",
        port=0,
        operator_keys=[public_bytes(operator_key)],
        heartbeat=5.0,
        grace_period=1.0,
    )
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, config)
        try:
            yield handle
        finally:
            with trio.fail_after(10):
                await handle.shutdown()


# --- a device in a tmp dir, and the releaser its tests push to ------------------------

OPERATOR_KEY = private_key_from_seed(b"\x09" * 32)


def releaser(tmp_path: Path) -> AbstractAsyncContextManager[ServerHandle]:
    return running_releaser(tmp_path, OPERATOR_KEY)


async def publish(
    handle: ServerHandle,
    tmp_path: Path,
    version: str,
    behavior: str = "ok",
    kind: str = "embedded_app",
    approve: bool = True,
) -> None:
    src = app_release(tmp_path, kind, version, behavior)
    publish_release(tmp_path / "data", src, app="demo", version=version, signing_keys=[RELEASE_KEY])
    if approve:
        async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
            await op.approve("demo", version)


async def push(
    handle: ServerHandle, version: str, mode: str = "force", restart: bool = True
) -> None:
    async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op:
        await op.push(app="demo", version=version, mode=mode, restart=restart, devices=["dev-1"])


class DeviceDir:
    """dev-1's folders under ``tmp_path/device``, v1 of an app kind, and its agent.toml.

    ``defaults`` are a test file's own settings; ``settings`` a single test's.
    """

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        kind: str,
        log_name: str,
        defaults: dict[str, object],
        settings: dict[str, object],
    ) -> None:
        self.root = tmp_path / "device"
        self.app_root = self.root / "app"
        self.state_dir = self.root / "state"
        self.status = self.root / "status"
        self.log = self.root / log_name
        shutil.copytree(app_release(tmp_path / "v1", kind, "1.0.0"), self.app_root)
        base: dict[str, object] = dict(
            server=f"127.0.0.1:{port}",
            app="demo",
            version="1.0.0",
            device_id="dev-1",
            state_dir=str(self.state_dir),
            app_root=str(self.app_root),
            trusted_keys=[key_hex(RELEASE_KEY)],
            auto_check=False,
            backoff_initial=0.1,
            backoff_max=0.5,
        )
        base.update(defaults)
        base.update(settings)
        self.toml = write_agent_toml(self.root / "agent.toml", **base)

    def state(self) -> DeviceState:
        return load_state(self.state_dir)

    async def wait_state(
        self, pred: Callable[[DeviceState], bool], timeout: float = 30.0
    ) -> DeviceState:
        with trio.fail_after(timeout):
            while True:
                s = self.state()
                if pred(s):
                    return s
                await trio.sleep(0.1)
