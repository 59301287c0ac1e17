"""Measure push latency: operator push -> each of N connected devices receiving the command.

Not collected by pytest. Run::

    /work/venv/bin/python tests/server/bench_server_push.py --devices 1000

The releaser runs as a ``fleetpush server`` subprocess; the devices and the
operator run in this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.events import RequestReceived
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Ack, Hello, Push
from fleetpush.server import ReleaseStore, publish_release

from fleetpush.net.dial import dial
from fleetpush.net.peer import Peer


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(port: int, devices: int, op_key: Ed25519PrivateKey, pid: int) -> list[float]:
    received: dict[str, float] = {}
    ready = 0
    all_ready = trio.Event()
    done = trio.Event()

    async def device(index: int) -> None:
        nonlocal ready
        key = Ed25519PrivateKey.generate()

        async def on_request(peer: Peer, ev: RequestReceived) -> None:
            received[f"d{index}"] = time.perf_counter()
            if len(received) == devices:
                done.set()
            await peer.respond(ev.id, Ack(accepted=True))

        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=f"d{index}",
            public_key=public_bytes(key),
            app="demo",
            version="1.0",
            channel="stable",
        )
        async with dial(
            ("127.0.0.1", port), key, hello, timeout=60, heartbeat=60, on_request=on_request
        ):
            ready += 1
            if ready == devices:
                all_ready.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        for i in range(devices):
            nursery.start_soon(device, i)
        await all_ready.wait()
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            role="operator",
            peer_id="bench",
            public_key=public_bytes(op_key),
        )
        async with dial(("127.0.0.1", port), op_key, hello, timeout=10, heartbeat=60) as link:
            op = link.peer
            await trio.sleep(0.5)
            cpu = cpu_seconds(pid)
            start = time.perf_counter()
            result = await op.request(
                "push", Push(app="demo", version="1.1", mode="force", all=True)
            )
            answered = time.perf_counter() - start
            await done.wait()
            cpu = cpu_seconds(pid) - cpu
    print(f"server CPU for the push and its {devices} deliveries: {cpu * 1000:.0f} ms")
    print(
        f"push answered after {answered * 1000:.1f} ms;"
        f" sent={len(result.sent)} queued={len(result.queued)}"
    )
    return sorted(t - start for t in received.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--profile", metavar="PATH", help="run the server through this profiling wrapper script"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.devices + 100)), hard))
    work = Path(tempfile.mkdtemp(prefix="fp-push-"))
    src = work / "src"
    src.mkdir()
    (src / "app").write_text("1.1")
    publish_release(work / "data", src, app="demo", version="1.1")
    store = ReleaseStore.open(work / "data")
    store.set_status("demo", "1.1", "pre-released", "bench")
    store.close()
    op_key = Ed25519PrivateKey.generate()
    exe = shutil.which("fleetpush", path=str(Path(sys.executable).parent)) or "fleetpush"
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--insecure",  # the bench's devices and operator speak plain TCP
            "--data-dir",
            str(work / "data"),
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            str(args.devices + 10),
            "--operator-key",
            public_bytes(op_key).hex(),
            "--handshake-timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        lat = trio.run(run, port, args.devices, op_key, proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(
        f"devices={len(lat)} latency p50={statistics.median(lat) * 1000:.1f} ms "
        f"p99={p99 * 1000:.1f} ms max={lat[-1] * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
