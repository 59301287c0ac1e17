"""Device CPU and peak RSS of one full download, measured (issue 14, items 2 and 4).

    python scripts/download_cpu.py [--size 1GiB] [--files 4] [--repeat 3] [--hash blake3]

A release of ``--files`` incompressible files totalling ``--size`` is
published; a real ``fleetpush server`` process serves it over loopback
(``--insecure``: TLS has its own script, tls_cost.py) to one device, a
:mod:`fleetpush.bench.fleet` worker process, which downloads it ``--repeat``
times into a fresh state directory each time. Printed per download: wall
seconds and the device's CPU seconds (utime + stime from /proc/PID/stat; the
worker's removal of the staged files afterwards is included), and at the end
the device's peak RSS (VmHWM from /proc/PID/status) and the CPU seconds per GiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import trio
from fleetpush.protocol.keys import public_bytes
from fleetpush.server import publish_release

from fleetpush.bench.harness import Worker
from fleetpush.demo.processes import Children, peak_rss
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect

APP = "dlcpu"
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


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="release size (default 1GiB)")
    ap.add_argument("--files", type=int, default=4, help="files in the release (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="downloads (default 3)")
    ap.add_argument("--hash", default="blake3", help="hash algorithm (default blake3)")
    ap.add_argument("--chunking", default=None, help="passed to publish_release if supported")
    args = ap.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="fleetpush-dl-cpu-"))
    try:
        return run(root, size, args.files, args.repeat, algo=args.hash, chunking=args.chunking)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, size: int, files: int, repeat: int, *, algo: str, chunking: str | None) -> int:
    rel_key, op_key = generate_private_key(), generate_private_key()
    src = root / "src"
    src.mkdir()
    for i in range(files):
        with open(src / f"part{i}.bin", "wb") as f:
            left = size // files
            while left:
                block = os.urandom(min(left, 4 * 1024 * 1024))
                f.write(block)
                left -= len(block)
    data = root / "data"
    extra = {} if chunking is None else {"chunking": chunking}
    publish_release(
        data, src, app=APP, version=VERSION, hash_algorithm=algo, signing_keys=[rel_key], **extra
    )
    shutil.rmtree(src)
    op_hex, rel_hex = public_bytes(op_key).hex(), public_bytes(rel_key).hex()
    with Children(root / "logs") as children:
        child, host, port = children.start_server(
            data, operator_keys=[op_hex], release_keys=[rel_hex], insecure=True
        )

        async def approve() -> None:
            async with connect((host, port), op_key, name="dl-cpu") as op:
                await op.approve(APP, VERSION)

        trio.run(approve)
        job = {
            "host": host, "port": port, "app": APP, "release_key": rel_hex,
            "devices": 1, "prefix": "dl-cpu", "workdir": str(root / "dev"), "window": 16,
        }  # fmt: skip
        worker = Worker(children, "device", job, root)
        worker.read(60)
        pid = worker.child.pid
        base = peak_rss(pid)
        print(f"  device VmHWM before downloading {base / 1024**2:.1f} MB", flush=True)
        secs, cpus = [], []
        for _ in range(repeat):
            before = cpu_seconds(pid)
            answer = worker.ask(f"download {APP} {VERSION}", 900)
            cpus.append(cpu_seconds(pid) - before)
            secs.append(float(answer["elapsed"]))
            print(f"  download {secs[-1]:.2f}s  device CPU {cpus[-1]:.2f}s", flush=True)
        hwm = peak_rss(pid)
        worker.quit()
        del child
    gib = size / 1024**3
    print(
        f"{size / 1024**2:.0f} MiB in {files} files ({algo}), median of {repeat}: "
        f"{statistics.median(secs):.2f}s wall, device CPU "
        f"{statistics.median(cpus) / gib:.2f} s/GiB, device VmHWM {hwm / 1024**2:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
