"""50 honest devices keep downloading while hostile peers attack the releaser.

The releaser runs as its own process (``fleetpush server``). Honest devices
(fleetpush.net.peer + the real handshake) connect first, then download the
release over and over, verifying every chunk and every file against the
signed manifest. Attackers, all at once and repeatedly:

- ``oversize``: a frame header declaring a 100 MiB body;
- ``bomb``: a hello whose body is the 2.7 KB nested-array header bomb, and,
  after authenticating, 8 MiB bodies of nested empty arrays (the container
  amplification tests/hostile found);
- ``drip``: a valid hello sent one byte per second;
- ``non_reader``: authenticates, asks for every chunk again and again, never reads;
- ``over_limit``: opens connections past ``max_connections`` and holds them;
- ``flood``: authenticates and pipelines requests as fast as it can.

Run as a script to print the honest throughput with and without the attack::

    /work/venv/bin/python tests/hostile/hostile_peers.py --devices 50 --seconds 15
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    FleetpushError,
    Manifest,
    ResponseReceived,
    Side,
    auth_payload,
    codec,
    sign_challenge,
)
from fleetpush.protocol.frames import HEADER, MAGIC, PROTOCOL_MAJOR, encode_message_frame
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Auth, GetChunks, GetManifest, Hello
from fp_keys import fixed_key
from fp_releaser import start_releaser_process
from fp_trees import make_release_dir
from hostile_fleet import APP, publish_approved

from fleetpush.net.dial import dial
from fleetpush.net.peer import PeerClosed

VERSION = "2.0.0"


def hello(key: Ed25519PrivateKey, peer_id: str) -> Hello:
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=peer_id,
        public_key=public_bytes(key),
        app=APP,
        version="1.0.0",
        channel="stable",
    )


class Stats:
    def __init__(self) -> None:
        self.honest_bytes = 0
        self.honest_downloads = 0
        self.honest_errors: list[str] = []
        self.attacks: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.measuring = False


async def honest_device(port: int, index: int, stats: Stats, stop: trio.Event) -> None:
    # The same key every run: the registry binds each device id to its first key.
    key = fixed_key(f"honest{index}")
    async with dial(
        ("127.0.0.1", port), key, hello(key, f"honest-{index}"), timeout=20, name=f"honest-{index}"
    ) as link:
        peer = link.peer
        result = await peer.request("get_manifest", GetManifest(app=APP, version=VERSION))
        manifest = Manifest.from_bytes(result.manifest.signed)
        wanted = [(i, c) for i, f in enumerate(manifest.files) for c in range(len(f.chunks))]
        while not stop.is_set():
            hashers = [hashlib.sha256() for _ in manifest.files]
            for start in range(0, len(wanted), 16):
                batch = wanted[start : start + 16]
                chunks, done = await peer.request_chunks(
                    GetChunks(app=APP, version=VERSION, chunks=batch), buffer=16
                )
                async for chunk in chunks:
                    data = chunk.payload
                    entry = manifest.files[chunk.file]
                    if hashlib.sha256(data).digest() != entry.chunks[chunk.chunk]:
                        stats.honest_errors.append(f"bad chunk {chunk.file}/{chunk.chunk}")
                    hashers[chunk.file].update(data)
                    if stats.measuring:
                        stats.honest_bytes += len(data)
                await done()
            for h, entry in zip(hashers, manifest.files, strict=True):
                if h.digest() != entry.digest:
                    stats.honest_errors.append(f"bad file {entry.path}")
            if stats.measuring:
                stats.honest_downloads += 1


# --- attackers ------------------------------------------------------------------------------


async def _raw(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _until_closed(stream: trio.SocketStream, limit: float) -> str:
    """Read until the releaser closes us; the outcome names how."""
    with trio.move_on_after(limit):
        try:
            while await stream.receive_some(65536):
                pass
            return "closed"
        except (trio.BrokenResourceError, OSError):
            return "reset"
    return "still open"


async def attack_oversize(port: int, stats: Stats) -> None:
    async with await _raw(port) as s:
        await s.send_all(HEADER.pack(MAGIC, PROTOCOL_MAJOR, 1, 100 * 1024 * 1024) + b"x" * 100)
        stats.outcomes["oversize:" + await _until_closed(s, 5)] += 1


async def attack_bomb(port: int, stats: Stats) -> None:
    async with await _raw(port) as s:
        await s.send_all(encode_message_frame(b"\xdc\x27\x10" * 900))
        stats.outcomes["bomb:" + await _until_closed(s, 5)] += 1


def _amplification_body() -> bytes:
    inner = b"\xdc" + struct.pack(">H", 60000) + b"\x90" * 60000
    n = (8 * 1024 * 1024 - 16) // len(inner)
    return b"\xdc" + struct.pack(">H", n) + inner * n


async def raw_handshake(port: int, name: str) -> tuple[trio.SocketStream, Connection]:
    """Authenticate as a new device over a bare socket; no reader task runs afterwards."""
    key = Ed25519PrivateKey.generate()
    stream = await _raw(port)
    conn = Connection(Side.CLIENT, now=trio.current_time())
    try:
        await _handshake(stream, conn, key, name)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, conn


async def _handshake(
    stream: trio.SocketStream, conn: Connection, key: Ed25519PrivateKey, name: str
) -> None:
    async def answer() -> Any:
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    raise PeerClosed(1001, "closed during handshake")
                conn.receive_data(data, trio.current_time())
                continue
            if isinstance(ev, ResponseReceived):
                return ev.result
            raise PeerClosed(1002, f"unexpected {ev!r}")

    with trio.fail_after(10):
        h = hello(key, f"{name}-{id(stream)}")
        await stream.send_all(conn.send_request("hello", h)[1])
        result = await answer()
        payload = auth_payload(
            server_id=result.server_id, cid=result.cid, nonce=result.nonce,
            role="device", peer_id=h.peer_id, public_key=h.public_key,
        )  # fmt: skip
        auth = Auth(signature=sign_challenge(key, payload))
        await stream.send_all(conn.send_request("auth", auth)[1])
        await answer()


async def attack_amplify(port: int, stats: Stats) -> None:
    """Authenticate honestly, then send an 8 MiB message of nested empty arrays."""
    stream, _ = await raw_handshake(port, "amplify")
    async with stream:
        await stream.send_all(encode_message_frame(_amplification_body()))
        stats.outcomes["amplify:" + await _until_closed(stream, 10)] += 1


async def attack_drip(port: int, stats: Stats) -> None:
    key = Ed25519PrivateKey.generate()
    _, frame = Connection(Side.CLIENT, now=0.0).send_request("hello", hello(key, "drip"))
    async with await _raw(port) as s:
        try:
            for b in frame:
                await s.send_all(bytes([b]))
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, OSError):
            stats.outcomes["drip:dropped"] += 1
            return
        stats.outcomes["drip:" + await _until_closed(s, 5)] += 1


async def attack_non_reader(port: int, stats: Stats) -> None:
    """Authenticate, ask for the whole release 16 times over, never read a byte."""
    stream, conn = await raw_handshake(port, "nonreader")
    async with stream:
        m_chunks = [(i, c) for i in range(2) for c in range(8)]
        for _ in range(16):
            _, data = conn.send_request(
                "get_chunks", GetChunks(app=APP, version=VERSION, chunks=m_chunks)
            )
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, OSError):
                stats.outcomes["non_reader:dropped"] += 1
                return
        await trio.sleep(6.0)  # past the releaser's 3 s send deadline, reading nothing
        stats.outcomes["non_reader:" + await _until_closed(stream, 5)] += 1


async def attack_flood(port: int, stats: Stats) -> None:
    """Authenticate, then pipeline 2,000 requests without waiting for one answer."""
    stream, _ = await raw_handshake(port, "flood")
    async with stream:
        blob = b"".join(
            encode_message_frame(
                codec.packb([0, 10_000 + i, "check_update", {"app": APP, "version": "1.0.0"}])
            )
            for i in range(2000)
        )
        try:
            await stream.send_all(blob)
        except (trio.BrokenResourceError, OSError):
            stats.outcomes["flood:dropped"] += 1
            return
        stats.outcomes["flood:" + await _until_closed(stream, 10)] += 1


async def attack_over_limit(port: int, stats: Stats, count: int) -> None:
    streams = []
    try:
        for _ in range(count):
            try:
                streams.append(await _raw(port))
            except OSError:
                stats.outcomes["over_limit:connect failed"] += 1
        await trio.sleep(0.5)
        async with trio.open_nursery() as nursery:

            async def watch(s: trio.SocketStream) -> None:
                stats.outcomes["over_limit:" + await _until_closed(s, 4)] += 1

            for s in streams:
                nursery.start_soon(watch, s)
    finally:
        with trio.CancelScope(shield=True):
            for s in streams:
                await s.aclose()


ATTACKS = ("oversize", "bomb", "amplify", "drip", "non_reader", "flood", "over_limit")


async def attackers(port: int, stats: Stats, stop: trio.Event, over_limit: int) -> None:
    async def loop(name: str, fn: Any, pause: float, *args: Any) -> None:
        while not stop.is_set():
            stats.attacks[name] += 1
            try:
                await fn(port, stats, *args)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, FleetpushError) as e:
                stats.outcomes[f"{name}:{type(e).__name__}"] += 1
            await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop, "oversize", attack_oversize, 0.2)
        nursery.start_soon(loop, "bomb", attack_bomb, 0.2)
        nursery.start_soon(loop, "amplify", attack_amplify, 1.0)
        for _ in range(5):
            nursery.start_soon(loop, "drip", attack_drip, 0.2)
        for _ in range(3):
            nursery.start_soon(loop, "non_reader", attack_non_reader, 0.5)
        nursery.start_soon(loop, "flood", attack_flood, 0.5)
        nursery.start_soon(loop, "over_limit", attack_over_limit, 1.0, over_limit)
        await stop.wait()
        nursery.cancel_scope.cancel()


# --- the run ---------------------------------------------------------------------------------


def start_releaser(data_dir: Path, max_connections: int) -> tuple[subprocess.Popen[str], int]:
    return start_releaser_process(
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--max-connections", str(max_connections),
        "--handshake-timeout", "3", "--frame-timeout", "3", "--send-timeout", "3",
        # every peer here, honest or not, is 127.0.0.1: the per-source
        # handshake cap has its own tests (tests/server/test_server_limits.py)
        "--max-handshaking-per-source", "10000",
        "--insecure",  # the hostile and honest peers speak plain TCP
    )  # fmt: skip


async def measure(
    port: int, devices: int, seconds: float, attack: bool, over_limit: int
) -> dict[str, Any]:
    stats = Stats()
    stop = trio.Event()
    with trio.fail_after(seconds + 90):
        async with trio.open_nursery() as nursery:
            for i in range(devices):
                nursery.start_soon(honest_device, port, i, stats, stop)
            await trio.sleep(2.0)  # every honest device connected and downloading
            if attack:
                nursery.start_soon(attackers, port, stats, stop, over_limit)
                await trio.sleep(1.0)
            stats.measuring = True
            started = time.monotonic()
            await trio.sleep(seconds)
            stats.measuring = False
            elapsed = time.monotonic() - started
            if attack:
                # Under a loaded machine one round of an attack (60 connections,
                # then up to 4 s of watching them) could still be running when
                # the window ended, and its outcome was never counted: let every
                # attack finish one round first (the throughput is measured above).
                with trio.move_on_after(30):
                    while not all(
                        any(k.startswith(a + ":") for k in stats.outcomes) for a in ATTACKS
                    ):
                        await trio.sleep(0.1)
            stop.set()
    return {
        "attack": attack,
        "honest_bps": stats.honest_bytes / elapsed,
        "honest_downloads": stats.honest_downloads,
        "honest_errors": stats.honest_errors,
        "attacks": dict(stats.attacks),
        "outcomes": dict(stats.outcomes),
    }


def run(
    tmp: Path, devices: int = 50, seconds: float = 10.0, size: int = 4 * 1024 * 1024
) -> dict[str, Any]:
    src = make_release_dir(tmp / "src", size)
    publish_approved(tmp / "data", src, VERSION, chunk_size=256 * 1024)
    max_connections = devices + 40
    proc, port = start_releaser(tmp / "data", max_connections)
    try:
        quiet = trio.run(measure, port, devices, seconds, False, 0)
        loud = trio.run(measure, port, devices, seconds, True, 60)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    return {"without_attack": quiet, "with_attack": loud, "releaser_survived": alive}


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--size-mb", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = run(Path(tmp), args.devices, args.seconds, args.size_mb * 1024 * 1024)
    print(json.dumps(out, indent=2))
    q, a = out["without_attack"]["honest_bps"], out["with_attack"]["honest_bps"]
    print(f"honest throughput: {q / 1e6:.1f} MB/s without attack, {a / 1e6:.1f} MB/s with")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
