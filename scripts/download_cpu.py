"""Device CPU and peak RSS of one full download, measured (issue 14, items 1-4).

    python scripts/download_cpu.py [--size 1GiB] [--files 4] [--repeat 3] [--hash blake3]
        [--chunking fixed|cdc] [--delta PERCENT]

A release of ``--files`` incompressible files totalling ``--size`` is
published; a real ``fleetpush server`` process serves it over loopback
(``--insecure``: TLS has its own script, tls_cost.py) to one device, a
:mod:`fleetpush.bench.fleet` worker process, which downloads it ``--repeat``
times into a fresh state directory each time. Printed per download: wall
seconds and the device's CPU seconds (utime + stime from /proc/PID/stat; the
worker's removal of the staged files afterwards is included), and at the end
the device's peak RSS (VmHWM from /proc/PID/status) and the CPU seconds per GiB.

With ``--delta PERCENT`` the device instead holds release 1.0 (its files in
the app root, its signed manifest installed) and downloads 2.0, in which
PERCENT of the bytes of the first file were overwritten in one run in the
middle: the device is then this script's own ``--device`` child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    ap.add_argument("--delta", type=float, default=None, help="percent overwritten in 2.0")
    ap.add_argument("--device", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is not None:
        trio.run(device_child, json.loads(args.device.read_text()))
        return 0
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="fleetpush-dl-cpu-"))
    try:
        if args.delta is not None:
            return run_delta(
                root, size, args.files, args.repeat, algo=args.hash, chunking=args.chunking,
                percent=args.delta,
            )  # fmt: skip
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
        secs, cpus, served = [], [], []
        for _ in range(repeat):
            before, server_before = cpu_seconds(pid), cpu_seconds(child.pid)
            answer = worker.ask(f"download {APP} {VERSION}", 900)
            cpus.append(cpu_seconds(pid) - before)
            served.append(cpu_seconds(child.pid) - server_before)
            secs.append(float(answer["elapsed"]))
            print(
                f"  download {secs[-1]:.2f}s  device CPU {cpus[-1]:.2f}s  "
                f"releaser CPU {served[-1]:.2f}s",
                flush=True,
            )
        hwm = peak_rss(pid)
        worker.quit()
        del child
    gib = size / 1024**3
    print(
        f"{size / 1024**2:.0f} MiB in {files} files ({algo}), median of {repeat}: "
        f"{statistics.median(secs):.2f}s wall, device CPU "
        f"{statistics.median(cpus) / gib:.2f} s/GiB (min {min(cpus) / gib:.2f}, max "
        f"{max(cpus) / gib:.2f}), releaser CPU {statistics.median(served) / gib:.2f} s/GiB "
        f"(min {min(served) / gib:.2f}, max {max(served) / gib:.2f}), "
        f"device VmHWM {hwm / 1024**2:.1f} MB"
    )
    return 0


# --- delta mode ------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * 1024 * 1024))
            f.write(block)
            left -= len(block)


def run_delta(
    root: Path,
    size: int,
    files: int,
    repeat: int,
    *,
    algo: str,
    chunking: str | None,
    percent: float,
) -> int:
    rel_key, op_key = generate_private_key(), generate_private_key()
    src1, src2 = root / "src1", root / "src2"
    src1.mkdir()
    for i in range(files):
        write_random(src1 / f"part{i}.bin", size // files)
    shutil.copytree(src1, src2)
    changed = min(int(size * percent / 100), size // files)
    with open(src2 / "part0.bin", "r+b") as f:
        f.seek((size // files - changed) // 2)
        f.write(os.urandom(changed))
    data = root / "data"
    extra = {} if chunking is None else {"chunking": chunking}
    for version, src in (("1.0", src1), ("2.0", src2)):
        publish_release(
            data, src, app=APP, version=version, hash_algorithm=algo, signing_keys=[rel_key],
            **extra,
        )  # fmt: skip
    shutil.rmtree(src2)
    op_hex, rel_hex = public_bytes(op_key).hex(), public_bytes(rel_key).hex()
    secs, cpus, results = [], [], []
    with Children(root / "logs") as children:
        child, host, port = children.start_server(
            data, operator_keys=[op_hex], release_keys=[rel_hex], insecure=True
        )

        async def approve() -> None:
            async with connect((host, port), op_key, name="dl-cpu") as op:
                await op.approve(APP, "1.0")
                await op.approve(APP, "2.0")

        trio.run(approve)
        for run_ in range(repeat):
            dev = root / f"dev{run_}"
            shutil.copytree(src1, dev / "app")
            job = {
                "host": host, "port": port, "release_key": rel_hex, "dir": str(dev),
                "device_id": f"dl-cpu-delta-{run_}",  # a new key each run: a new id
            }  # fmt: skip
            (root / "job.json").write_text(json.dumps(job))
            proc = subprocess.Popen(
                [sys.executable, __file__, "--device", str(root / "job.json")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert proc.stdin is not None and proc.stdout is not None
            assert json.loads(proc.stdout.readline())["ready"]
            before = cpu_seconds(proc.pid)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            cpus.append(cpu_seconds(proc.pid) - before)
            hwm = peak_rss(proc.pid)
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(60)
            secs.append(float(answer["elapsed"]))
            results.append(answer)
            print(f"  update {secs[-1]:.2f}s  device CPU {cpus[-1]:.2f}s  {answer}", flush=True)
            shutil.rmtree(dev)
        del child
    print(
        f"delta {percent}% of {size / 1024**2:.0f} MiB in {files} files ({algo}, "
        f"{chunking or 'fixed'}), median of {repeat}: {statistics.median(secs):.2f}s wall "
        f"(min {min(secs):.2f}), device CPU {statistics.median(cpus):.2f}s "
        f"(min {min(cpus):.2f}), device VmHWM {hwm / 1024**2:.1f} MB"
    )
    return 0


async def device_child(job: dict[str, Any]) -> None:
    """The device of --delta: install 1.0's manifest, wait for "go", download 2.0."""
    from fleetpush.client import download as dl
    from fleetpush.client.layout import StateLayout
    from fleetpush.protocol import PROTOCOL_VERSION, codec
    from fleetpush.protocol.handshake import hash_capabilities
    from fleetpush.protocol.keys import public_key_from_hex
    from fleetpush.protocol.messages import GetManifest, Hello
    from fleetpush.protocol.trust import TrustRoot, verify_manifest

    from fleetpush.net.dial import dial

    caps = getattr(dl, "capabilities", hash_capabilities)()
    key = generate_private_key()
    hello = Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id=job["device_id"],
        public_key=public_bytes(key), app=APP, version="1.0", channel="stable",
        capabilities=caps,
    )  # fmt: skip
    trust = TrustRoot.from_public_keys([public_key_from_hex(job["release_key"])])
    root = Path(job["dir"])
    layout = StateLayout.of(root / "state")
    async with dial((job["host"], job["port"]), key, hello, timeout=60.0, tls=None) as link:
        peer = link.peer
        verified = {}
        for version in ("1.0", "2.0"):
            res = await peer.request("get_manifest", GetManifest(app=APP, version=version))
            verified[version] = (
                res.manifest,
                verify_manifest(
                    trust, res.manifest, app=APP, high_water=0, now=time.time(),
                    installed_version=None,
                ).manifest,
            )  # fmt: skip
        layout.installed_dir.mkdir(parents=True)
        layout.installed_manifest.write_bytes(codec.packb(codec.to_wire(verified["1.0"][0])))
        print(json.dumps({"ready": True}), flush=True)
        assert sys.stdin.readline().strip() == "go"
        signed, m = verified["2.0"]
        profile = None
        if os.environ.get("DL_CPU_PROFILE"):  # cProfile of the trio thread, for digging
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        result = await dl.download(peer, signed, m, layout, root / "app", request_timeout=300.0)
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.environ["DL_CPU_PROFILE"])
        fields = ("elapsed", "bytes_fetched", "bytes_copied", "bytes_resumed")
        answer = {k: getattr(result, k) for k in fields}
        answer["bytes_unchanged"] = getattr(result, "bytes_unchanged", 0)
        print(json.dumps(answer), flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    sys.exit(main())
