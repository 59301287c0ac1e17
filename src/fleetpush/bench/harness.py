"""`fleetpush bench`: every figure measured on loopback in one run.

Layout of a run (all in one temporary workspace, removed at the end):

- the releaser runs as its own process (``fleetpush server``), so its peak
  RSS (``/proc/PID/status`` VmHWM) is its own;
- the devices run in worker processes (:mod:`fleetpush.bench.fleet`): one
  worker with one device for the single-download figures (its VmHWM is
  ``client_peak_rss_bytes``) and one worker holding ``--devices`` device
  connections for the fan-out and the push latency;
- the baselines (:mod:`fleetpush.bench.baseline`) run in the same run, on
  the same files.

Each figure is the median of ``--repeat`` runs; ratios are of the medians.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from fleetpush.demo.processes import Children, peak_rss, raise_nofile
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect
from fleetpush.protocol.hashing import available_algorithms
from fleetpush.protocol.keys import public_bytes

from .baseline import BenchError, hash_rate, make_file, raw_tcp

APP = "bench"
FANOUT_APP = "bench-fanout"
PUSH_TIMEOUT = 30.0
Report = Callable[[str], None]


@attrs.define
class BenchOptions:
    size: int = 1 << 30
    fanout_size: int = 10 << 20
    devices: int = 100
    repeat: int = 3
    workdir: Path | None = None
    #: chunks outstanding per device: the updater's default for the single
    #: download; fan-out devices share the link, so each keeps a small window.
    window: int = 16
    fanout_window: int = 2
    #: chunk size of the fan-out release: every connection buffers about one
    #: chunk while a frame arrives, so many devices want smaller chunks.
    fanout_chunk_size: int = 256 * 1024


class Worker:
    """A :mod:`fleetpush.bench.fleet` process and its line protocol."""

    def __init__(self, children: Children, name: str, job: dict[str, Any], workdir: Path) -> None:
        jobfile = workdir / f"{name}.json"
        jobfile.write_text(json.dumps(job))
        self.name = name
        self.child = children.start(
            name,
            [sys.executable, "-m", "fleetpush.bench.fleet", str(jobfile)],
            stdout_pipe=True,
            stdin_pipe=True,
        )

    def _stdin(self) -> IO[bytes]:
        assert self.child.popen.stdin is not None
        return self.child.popen.stdin

    def read(self, timeout: float) -> dict[str, Any]:
        out = self.child.popen.stdout
        assert out is not None
        result: list[bytes] = []

        t = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            raise BenchError(
                f"bench worker {self.name} did not answer within {timeout:.0f}s:\n"
                + self.child.log_tail()
            )
        answer: dict[str, Any] = json.loads(result[0])
        return answer

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        stdin = self._stdin()
        stdin.write(command.encode() + b"\n")
        stdin.flush()
        return self.read(timeout)

    def quit(self) -> None:
        try:
            stdin = self._stdin()
            stdin.write(b"quit\n")
            stdin.close()
            self.child.popen.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.child.stop(2.0)


@contextmanager
def workspace(prefix: str, workdir: str | Path | None) -> Iterator[Path]:
    """A fresh folder for one bench run (under ``workdir``), always removed."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def need_descriptors(devices: int) -> None:
    """Raise the open-files limit for ``devices`` connections. Raises BenchError if too low."""
    nofile = raise_nofile(devices * 2 + 512)
    if nofile < devices + 64:
        raise BenchError(f"RLIMIT_NOFILE is {nofile}: too low for {devices} devices")


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def run_bench(opts: BenchOptions, report: Report) -> dict[str, Any]:
    """Run every phase; returns the JSON document. Raises :class:`BenchError`."""
    with workspace("fleetpush-bench-", opts.workdir) as root:
        return _run(opts, root, report)


def _run(opts: BenchOptions, root: Path, report: Report) -> dict[str, Any]:
    need_descriptors(opts.devices)
    op_key, rel_key = generate_private_key(), generate_private_key()
    rel_hex = public_bytes(rel_key).hex()
    data_dir = root / "data"
    src = root / "src"
    report(f"workspace {root}; making a {_mib(opts.size)} and a {_mib(opts.fanout_size)} file")
    (src / "single").mkdir(parents=True)
    (src / "fanout").mkdir(parents=True)
    big = src / "single" / "payload.bin"
    make_file(big, opts.size, seed=1)
    make_file(src / "fanout" / "payload.bin", opts.fanout_size, seed=2)

    from fleetpush.server import publish_release

    algorithms = ["sha256"] + (["blake3"] if "blake3" in available_algorithms() else [])
    fanout_hash = algorithms[-1]
    report("publishing the releases (hashing and copying into the data dir)")
    for i, algo in enumerate(algorithms):
        publish_release(
            data_dir,
            src / "single",
            app=APP,
            version=f"1.{i}.0",
            hash_algorithm=algo,
            signing_keys=[rel_key],
        )
    publish_release(
        data_dir,
        src / "fanout",
        app=FANOUT_APP,
        version="1.0.0",
        hash_algorithm=fanout_hash,
        chunk_size=opts.fanout_chunk_size,
        signing_keys=[rel_key],
    )
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    with Children(root / "logs") as children:
        server, host, port = children.start_server(
            data_dir,
            operator_keys=[public_bytes(op_key).hex()],
            insecure=True,  # the bench measures the protocol; scripts/tls_cost.py measures TLS
            release_keys=[rel_hex],
            # Every simulated device dials from 127.0.0.1: one source address
            # stands for a whole fleet, so the per-source handshake cap (a
            # defence against strangers) is lifted to the fleet's size.
            extra=[
                "--max-connections",
                str(opts.devices + 64),
                "--max-handshaking",
                str(opts.devices + 64),
                "--max-handshaking-per-source",
                str(opts.devices + 64),
            ],
        )
        report(f"releaser pid {server.pid} listening on {host}:{port}")

        async def approve() -> None:
            async with connect((host, port), op_key, name="bench") as op:
                for i in range(len(algorithms)):
                    await op.approve(APP, f"1.{i}.0")
                await op.approve(FANOUT_APP, "1.0.0")

        trio.run(approve)

        job = {
            "host": host,
            "port": port,
            "app": APP,
            "release_key": rel_hex,
            "window": opts.window,
        }
        single = Worker(
            children,
            "single",
            {**job, "devices": 1, "prefix": "bench-single", "workdir": str(root / "single")},
            root,
        )
        single.read(60)
        report(f"connecting {opts.devices} devices")
        fleet = Worker(
            children,
            "fleet",
            {
                **job,
                "app": FANOUT_APP,
                "devices": opts.devices,
                "prefix": "bench-fleet",
                "window": opts.fanout_window,
                "io_threads": 1,
                "workdir": str(root / "fleet"),
            },
            root,
        )
        ready = fleet.read(max(60.0, opts.devices * 0.2))
        report(f"{ready['ready']} devices connected")

        for run in range(1, opts.repeat + 1):
            report(f"run {run}/{opts.repeat}")
            rate = raw_tcp(big, root)
            add("raw_tcp_bps", rate)
            report(f"  raw tcp            {_rate(rate)}")
            rate = hash_rate(opts.size)
            add("hash_sha256_bps", rate)
            report(f"  sha256 hashing     {_rate(rate)}")
            for i, algo in enumerate(algorithms):
                ans = single.ask(f"download {APP} 1.{i}.0", 3600)
                rate = ans["bytes"] / ans["elapsed"]
                add(f"single_{algo}_bps", rate)
                report(f"  single {algo:<7}     {_rate(rate)}")
            ans = fleet.ask(f"download {FANOUT_APP} 1.0.0", 3600)
            rate = ans["bytes"] / ans["elapsed"]
            add("fanout_bps", rate)
            report(
                f"  fan-out {ans['devices']} x {_mib(opts.fanout_size)} {_rate(rate)} "
                f"({ans['elapsed']:.2f}s)"
            )
            lat = _push_latency(fleet, host, port, op_key, opts.devices)
            add("push_latency_p50_s", lat[0])
            add("push_latency_p99_s", lat[1])
            add("push_latency_max_s", lat[2])
            report(
                f"  push latency       p50 {lat[0] * 1e3:.1f} ms  p99 {lat[1] * 1e3:.1f} ms  "
                f"max {lat[2] * 1e3:.1f} ms"
            )
        client_rss = single.ask("rss", 30)["rss"]
        fleet_rss = fleet.ask("rss", 30)["rss"]
        server_rss = peak_rss(server.pid)
        single.quit()
        fleet.quit()

    doc: dict[str, Any] = {name: _median(values) for name, values in results.items()}
    doc["fanout_devices"] = opts.devices
    doc["server_peak_rss_bytes"] = server_rss
    doc["client_peak_rss_bytes"] = client_rss
    doc["fanout_client_peak_rss_bytes"] = fleet_rss
    doc["size_bytes"] = opts.size
    doc["fanout_size_bytes"] = opts.fanout_size
    doc["fanout_hash"] = fanout_hash
    doc["fanout_chunk_size"] = opts.fanout_chunk_size
    doc["repeat"] = opts.repeat
    doc["runs"] = results
    raw = doc["raw_tcp_bps"]
    ratios = {
        "single_sha256_vs_raw_tcp": doc["single_sha256_bps"] / raw,
        "single_sha256_vs_hash_sha256": doc["single_sha256_bps"] / doc["hash_sha256_bps"],
        "fanout_vs_raw_tcp": doc["fanout_bps"] / raw,
    }
    if "single_blake3_bps" in doc:
        ratios["single_blake3_vs_raw_tcp"] = doc["single_blake3_bps"] / raw
    doc["ratios"] = ratios
    return doc


def _push_latency(
    fleet: Worker, host: str, port: int, key: Any, devices: int
) -> tuple[float, float, float]:
    fleet.ask("arm", 30)

    async def push() -> float:
        async with connect((host, port), key, name="bench") as op:
            t0 = time.monotonic()
            result = await op.push(app=FANOUT_APP, version="1.0.0", mode="force", all=True)
            if len(result.sent) < devices:
                raise BenchError(
                    f"push reached {len(result.sent)} of {devices} connected devices "
                    f"({len(result.queued)} queued)"
                )
            return t0

    t0 = trio.run(push)
    times = fleet.ask(f"collect {PUSH_TIMEOUT}", PUSH_TIMEOUT + 30)["times"]
    if len(times) < devices:
        raise BenchError(f"only {len(times)} of {devices} devices got __force_update__")
    lat = sorted(t - t0 for t in times)
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]  # nearest rank
    return _median(lat), p99, lat[-1]


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.1f} GiB"


def _rate(bps: float) -> str:
    return f"{bps / 1e6:8.1f} MB/s"
