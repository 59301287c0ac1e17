"""What TLS (the default since issue 10, item 14) costs: plain TCP vs TLS, measured.

    python scripts/tls_cost.py [--size 256MiB] [--repeat 3] [--connects 50]

One release of ``--size`` incompressible bytes is published once; two
``fleetpush server`` processes serve copies of the same data dir, one with
``--insecure`` (plain TCP) and one with its default self-signed certificate
(TLS, the device pins it). One device (a :mod:`fleetpush.bench.fleet` worker
process, the bench's single-download device) per releaser downloads the
release; the downloads alternate plain, TLS, plain, TLS, ... so that load
from anything else on the machine hits both alike. Printed: the median
seconds and MiB/s of each, the CPU seconds the releaser and the device
spent per download (from /proc: steadier than wall time on a busy machine),
and the median time of an operator connect + handshake. All on
loopback: the ratio is the CPU cost of encryption, which a real network hides
or not depending on its speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from fleetpush.protocol.keys import public_bytes
from fleetpush.server import publish_release

from fleetpush.bench.harness import Worker
from fleetpush.demo.processes import Children
from fleetpush.net.keys import generate_private_key
from fleetpush.net.tls import ClientTls
from fleetpush.operator import connect

APP = "tlscost"
VERSION = "1.0.0"
UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    for unit, factor in UNITS.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (clock ticks in /proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def connect_times(
    address: tuple[str, int], key: object, tls: ClientTls | None, n: int
) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with connect(address, key, name="tls-cost", tls=tls):  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256MiB", help="release size (default 256MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="downloads per mode (default 3)")
    ap.add_argument("--connects", type=int, default=50, help="handshakes per mode (default 50)")
    args = ap.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="fleetpush-tls-cost-"))
    try:
        return run(root, size, args.repeat, args.connects)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, size: int, repeat: int, connects: int) -> int:
    rel_key, op_key = generate_private_key(), generate_private_key()
    src = root / "src"
    src.mkdir()
    with open(src / "blob.bin", "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * 1024 * 1024))
            f.write(block)
            left -= len(block)
    plain_dir, tls_dir = root / "plain", root / "tls"
    publish_release(plain_dir, src, app=APP, version=VERSION, signing_keys=[rel_key])
    shutil.copytree(plain_dir, tls_dir)
    shutil.rmtree(src)
    op_hex, rel_hex = public_bytes(op_key).hex(), public_bytes(rel_key).hex()

    with Children(root / "logs") as children:
        servers = {}
        for mode, data in (("plain", plain_dir), ("tls", tls_dir)):
            child, host, port = children.start_server(
                data, operator_keys=[op_hex], release_keys=[rel_hex], insecure=mode == "plain",
                name=f"releaser-{mode}",
            )  # fmt: skip
            tls = ClientTls(pin_sha256=child.tls_pin) if child.tls_pin else None
            servers[mode] = (child, (host, port), tls)

        async def approve() -> None:
            for _child, address, tls in servers.values():
                async with connect(address, op_key, name="tls-cost", tls=tls) as op:
                    await op.approve(APP, VERSION)

        trio.run(approve)
        workers = {}
        for mode, (_child, (host, port), tls) in servers.items():
            job = {
                "host": host, "port": port, "app": APP, "release_key": rel_hex,
                "devices": 1, "prefix": f"dev-{mode}", "workdir": str(root / f"w-{mode}"),
            }  # fmt: skip
            if tls is not None:
                job["tls_pin"] = tls.pin_sha256
            workers[mode] = Worker(children, f"device-{mode}", job, root)
            workers[mode].read(60)  # {"ready": 1}

        seconds: dict[str, list[float]] = {"plain": [], "tls": []}
        cpu: dict[str, list[float]] = {"plain": [], "tls": []}
        device_cpu: dict[str, list[float]] = {"plain": [], "tls": []}
        for round_ in range(repeat):
            for mode in ("plain", "tls") if round_ % 2 == 0 else ("tls", "plain"):
                pid, device_pid = servers[mode][0].pid, workers[mode].child.pid
                before, device_before = cpu_seconds(pid), cpu_seconds(device_pid)
                answer = workers[mode].ask(f"download {APP} {VERSION}", 600)
                cpu[mode].append(cpu_seconds(pid) - before)
                device_cpu[mode].append(cpu_seconds(device_pid) - device_before)
                assert answer["bytes"] >= size, answer
                seconds[mode].append(float(answer["elapsed"]))
                print(f"  {mode:<5} download {answer['elapsed']:.2f}s", flush=True)

        handshakes: dict[str, list[float]] = {"plain": [], "tls": []}
        for _ in range(2):  # interleaved halves
            for mode, (_child, address, tls) in servers.items():
                handshakes[mode] += trio.run(connect_times, address, op_key, tls, connects // 2)
        for w in workers.values():
            w.quit()

    mib = size / 1024**2
    print(f"\nrelease {mib:.0f} MiB, {repeat} downloads per mode, medians:")
    med = {m: statistics.median(v) for m, v in seconds.items()}
    for mode in ("plain", "tls"):
        print(
            f"  {mode:<5} {med[mode]:6.2f}s  {mib / med[mode]:7.1f} MiB/s  CPU releaser "
            f"{statistics.median(cpu[mode]):5.2f}s device "
            f"{statistics.median(device_cpu[mode]):5.2f}s"
            "  operator connect+handshake "
            f"{statistics.median(handshakes[mode]) * 1000:6.1f} ms"
        )
    print(f"  TLS/plain download time: {med['tls'] / med['plain']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
