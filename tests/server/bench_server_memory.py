"""Measure the releaser's peak RSS while N devices download one large release at once.

Not collected by pytest (the name does not start with ``test_``). Run::

    /work/venv/bin/python tests/server/bench_server_memory.py --size-mib 1024 --devices 100

It publishes a release of one random file, starts ``fleetpush server`` as a
subprocess, connects the devices from this process (each fetching every chunk
in windows of 64, counting bytes and checking every chunk digest against the
manifest), and prints the server's peak RSS (VmHWM) and the throughput.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION, Connection, Manifest, Side
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import GetChunks, GetManifest, Hello
from fleetpush.server import ReleaseStore, publish_release

from fleetpush.net.peer import client_handshake, open_peer


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def device(port: int, index: int, verify: bool, totals: list[int]) -> None:
    key = Ed25519PrivateKey.generate()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = Connection(Side.CLIENT, now=trio.current_time(), heartbeat=30.0)
    async with open_peer(
        stream, conn, name=f"bench-{index}", send_timeout=120, frame_timeout=120
    ) as peer:
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=f"bench-{index}",
            public_key=public_bytes(key),
            app="big",
            version="0.1",
            channel="stable",
        )
        await client_handshake(peer, key, hello, timeout=60)
        result = await peer.request(
            "get_manifest", GetManifest(app="big", version="1.0"), timeout=60
        )
        manifest = Manifest.from_bytes(result.manifest.signed)
        wanted = [(i, c) for i, f in enumerate(manifest.files) for c in range(len(f.chunks))]
        for start in range(0, len(wanted), 64):
            chunks, done = await peer.request_chunks(
                GetChunks(app="big", version="1.0", chunks=wanted[start : start + 64]), buffer=2
            )
            async for chunk in chunks:
                if verify:
                    digest = hashlib.sha256(chunk.payload).digest()
                    assert digest == manifest.files[chunk.file].chunks[chunk.chunk]
                totals[0] += len(chunk.payload)
            await done(120)


async def run(port: int, devices: int, verify: bool, pid: int) -> tuple[int, float, int]:
    totals = [0]
    peak_sampled = 0
    start = time.monotonic()
    async with trio.open_nursery() as nursery:

        async def sampler() -> None:
            nonlocal peak_sampled
            while True:
                peak_sampled = max(peak_sampled, proc_status(pid, "VmRSS"))
                await trio.sleep(0.2)

        nursery.start_soon(sampler)
        async with trio.open_nursery() as fleet:
            for i in range(devices):
                fleet.start_soon(device, port, i, verify, totals)
        nursery.cancel_scope.cancel()
    return totals[0], time.monotonic() - start, peak_sampled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--no-verify", action="store_true", help="skip client-side chunk hashing")
    parser.add_argument("--keep", type=Path, help="use/keep this workspace")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="fp-bench-"))
    data, src = work / "data", work / "src"
    if not (data / "fleetpush.db").exists():
        src.mkdir(parents=True, exist_ok=True)
        with open(src / "blob.bin", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1024 * 1024))
        publish_release(data, src, app="big", version="1.0")
        store = ReleaseStore.open(data)
        store.set_status("big", "1.0", "pre-released", "bench")
        store.set_status("big", "1.0", "approved", "bench")
        store.close()
    exe = shutil.which("fleetpush", path=str(Path(sys.executable).parent)) or "fleetpush"
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--insecure",  # the bench's devices speak plain TCP
            "--data-dir",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            str(args.devices + 10),
            "--send-timeout",
            "120",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        baseline = proc_status(proc.pid, "VmRSS")
        total, seconds, sampled = trio.run(run, port, args.devices, not args.no_verify, proc.pid)
        peak = proc_status(proc.pid, "VmHWM")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    mib = 1024 * 1024
    print(
        f"devices={args.devices} release={args.size_mib} MiB served={total / mib:.0f} MiB "
        f"in {seconds:.1f}s ({total / seconds / mib:.0f} MiB/s)"
    )
    print(
        f"server RSS: idle {baseline / mib:.1f} MiB, peak (VmHWM) {peak / mib:.1f} MiB, "
        f"max sampled {sampled / mib:.1f} MiB; exit code {code}"
    )
    return 0 if total == args.devices * args.size_mib * mib else 1


if __name__ == "__main__":
    sys.exit(main())
