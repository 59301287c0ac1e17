"""`fleetpush bench --idle`: what N idle authenticated devices cost one releaser (issue 15 §4).

Layout: the releaser in its own process (``fleetpush server --insecure``),
and ``workers`` :mod:`fleetpush.bench.fleet` processes holding the devices
(real TCP links, each handshaken with its own device key). Each worker binds
its connections to its own loopback source address (127.0.0.2, .3, ...):
the kernel's ephemeral ports are per (source, destination) pair, so one
address would stop at about 28,000 links (ip_local_port_range 32768-60999).

Measured, once every device is connected and the releaser has settled:

- ``rss_per_device_bytes``: (median of the releaser's VmRSS samples over the
  idle window - its VmRSS before any device connected) / N;
- ``idle_cpu_percent``: the releaser's user+system CPU over the idle window
  (/proc/PID/stat), in percent of one core; the window should span several
  heartbeats (§6.2) so every link pinged in it;
- ``push_p50_s``/``push_p99_s``/``push_max_s``: one ``push --all`` of a
  force update, from just before the operator sends it to each device
  receiving ``__force_update__`` (every process stamps with CLOCK_MONOTONIC).
- ``push_releaser_cpu_us_per_device`` / ``push_workers_cpu_us_per_device``:
  the CPU time the releaser and the device workers spent on that push
  (from just before it was sent until every device got it and the
  releaser is back to its idle rate: the acks recorded), with the
  releaser's idle rate over that span taken out, divided by N. Less
  sensitive to other load on the machine than the latencies, and it says
  how much of a push's latency is the simulated devices' own work.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from fleetpush.demo.processes import Children, peak_rss
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect
from fleetpush.protocol.keys import public_bytes

from .baseline import BenchError
from .harness import Report, Worker, need_descriptors, workspace

APP = "bench-idle"
PUSH_TIMEOUT = 60.0
#: after the last arrival, the releaser's CPU is sampled every ACK_STEP
#: seconds until a step costs no more than idle (the acks are recorded), at
#: most ACK_SETTLE seconds
ACK_STEP = 0.5
ACK_SETTLE = 10.0


@attrs.define
class IdleOptions:
    devices: int = 10_000
    #: device processes; None: one per 10,000 devices
    workers: int | None = None
    #: seconds over which idle CPU and RSS are sampled
    idle_seconds: float = 60.0
    #: seconds to wait after the last device connected before sampling
    settle_seconds: float = 10.0
    #: the releaser's --heartbeat; None: its default
    heartbeat: float | None = None
    workdir: Path | None = None
    #: devices in lean selectors workers (lean_fleet.py) rather than trio ones
    lean: bool = os.environ.get("FLEETPUSH_BENCH_TRIO_WORKERS") is None


def run_idle_bench(opts: IdleOptions, report: Report) -> dict[str, Any]:
    """One run; returns the JSON document. Raises :class:`BenchError`."""
    with workspace("fleetpush-idle-", opts.workdir) as root:
        return _run(opts, root, report)


def _status_rss(pid: int) -> int:
    """Current resident set size (VmRSS) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"process {pid} has no VmRSS")


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` so far (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settle(pid: int, idle_rate: float) -> None:
    """Wait until ``pid`` spends no more CPU than ``idle_rate`` (+2% of a core) per step."""
    deadline = time.monotonic() + ACK_SETTLE
    cpu = _cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(ACK_STEP)
        now = _cpu_seconds(pid)
        if now - cpu <= (idle_rate + 0.02) * ACK_STEP:
            return
        cpu = now


def _fleet_cpu(fleet: list[Worker]) -> float:
    """CPU seconds of every device worker so far."""
    return sum(_cpu_seconds(w.child.popen.pid) for w in fleet)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _run(opts: IdleOptions, root: Path, report: Report) -> dict[str, Any]:
    n = opts.devices
    workers = opts.workers or max(1, math.ceil(n / 10_000))
    need_descriptors(n + 200)  # the releaser: one fd per device, a few of its own
    op_key, rel_key = generate_private_key(), generate_private_key()
    rel_hex = public_bytes(rel_key).hex()
    data_dir = root / "data"
    src = root / "src"
    src.mkdir(parents=True)
    (src / "app.txt").write_text("idle bench\n")

    from fleetpush.server import publish_release

    publish_release(data_dir, src, app=APP, version="1.0.0", signing_keys=[rel_key])
    limit = str(n + 256)
    extra = ["--max-connections", limit, "--max-handshaking", limit]
    extra += ["--max-handshaking-per-source", limit]
    if opts.heartbeat is not None:
        extra += ["--heartbeat", f"{opts.heartbeat:g}"]
    with Children(root / "logs") as children:
        server, host, port = children.start_server(
            data_dir,
            operator_keys=[public_bytes(op_key).hex()],
            insecure=True,  # memory and CPU of the links themselves; TLS is measured elsewhere
            release_keys=[rel_hex],
            extra=extra,
        )

        async def approve() -> None:
            async with connect((host, port), op_key, name="bench") as op:
                await op.approve(APP, "1.0.0")

        trio.run(approve)
        time.sleep(1.0)
        base_rss = _status_rss(server.pid)
        report(f"releaser pid {server.pid} on {host}:{port}, RSS {base_rss / 2**20:.1f} MiB")
        fleet: list[Worker] = []
        share = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]
        t_connect = time.monotonic()
        for w, count in enumerate(share):
            job = {
                "host": host,
                "port": port,
                "app": APP,
                "release_key": rel_hex,
                "devices": count,
                "prefix": f"idle{w}",
                "workdir": str(root / f"fleet{w}"),
                "local_address": f"127.0.0.{2 + w}",
                "connect_timeout": max(120.0, count * 0.05),
                "lean": opts.lean,
            }
            fleet.append(Worker(children, f"idle{w}", job, root))
        connected = 0
        for w, worker in enumerate(fleet):
            connected += int(worker.read(max(180.0, share[w] * 0.06))["ready"])
        connect_s = time.monotonic() - t_connect
        report(f"{connected} devices connected in {connect_s:.1f}s; settling")
        time.sleep(opts.settle_seconds)
        cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
        samples: list[int] = []
        while time.monotonic() - t0 < opts.idle_seconds:
            samples.append(_status_rss(server.pid))
            time.sleep(2.0)
        cpu1, t1 = _cpu_seconds(server.pid), time.monotonic()
        idle_cpu = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        rss = statistics.median(samples)
        per_device = (rss - base_rss) / connected
        report(
            f"  idle: RSS {rss / 2**20:.0f} MiB ({per_device / 1024:.1f} KiB/device), "
            f"CPU {idle_cpu:.1f}% of a core over {t1 - t0:.0f}s"
        )
        cpu_rel0, cpu_fleet0 = _cpu_seconds(server.pid), _fleet_cpu(fleet)
        t_push0 = time.monotonic()
        lat = _push(fleet, host, port, op_key, connected)
        _settle(server.pid, idle_cpu / 100.0)
        span = time.monotonic() - t_push0
        push_rel_cpu = _cpu_seconds(server.pid) - cpu_rel0 - idle_cpu / 100.0 * span
        push_fleet_cpu = _fleet_cpu(fleet) - cpu_fleet0
        report(
            f"  push to {connected}: p50 {lat[0] * 1e3:.0f} ms  p99 {lat[1] * 1e3:.0f} ms  "
            f"max {lat[2] * 1e3:.0f} ms; CPU releaser {push_rel_cpu * 1e6 / connected:.0f} "
            f"us/device, workers {push_fleet_cpu * 1e6 / connected:.0f} us/device"
        )
        threads = _threads(server.pid)
        server_peak = peak_rss(server.pid)
        worker_peak = [int(w.ask("rss", 30)["rss"]) for w in fleet]
        for worker in fleet:
            worker.quit()
    return {
        "devices": connected,
        "workers": workers,
        "lean_workers": opts.lean,
        "heartbeat_s": opts.heartbeat,
        "connect_s": round(connect_s, 1),
        "base_rss_bytes": base_rss,
        "idle_rss_bytes": int(rss),
        "rss_per_device_bytes": round(per_device),
        "idle_cpu_percent": round(idle_cpu, 2),
        "idle_window_s": round(t1 - t0, 1),
        "push_p50_s": round(lat[0], 4),
        "push_p99_s": round(lat[1], 4),
        "push_max_s": round(lat[2], 4),
        "push_releaser_cpu_us_per_device": round(push_rel_cpu * 1e6 / connected, 1),
        "push_workers_cpu_us_per_device": round(push_fleet_cpu * 1e6 / connected, 1),
        "load_average": list(os.getloadavg()),
        "server_peak_rss_bytes": server_peak,
        "server_threads": threads,
        "worker_peak_rss_bytes": worker_peak,
        "targets": {
            "rss_per_device_at_most_20KiB": per_device <= 20 * 1024,
            "idle_cpu_at_most_5_percent": idle_cpu <= 5.0,
            "push_p99_at_most_2s": lat[1] <= 2.0,
        },
    }


def _push(
    fleet: list[Worker], host: str, port: int, key: Any, devices: int
) -> tuple[float, float, float]:
    """One ``push --all``; returns (p50, p99, max) seconds to the devices. Raises BenchError."""
    for worker in fleet:
        worker.ask("arm", 120)

    async def push() -> float:
        async with connect((host, port), key, name="bench") as op:
            op.timeout = PUSH_TIMEOUT  # the answer comes after the hand-off to every link
            t0 = time.monotonic()
            result = await op.push(app=APP, version="1.0.0", mode="force", all=True)
            if len(result.sent) < devices:
                raise BenchError(
                    f"push reached {len(result.sent)} of {devices} connected devices "
                    f"({len(result.queued)} queued)"
                )
            return t0

    t0 = trio.run(push)
    times: list[float] = []
    for worker in fleet:
        times += worker.ask(f"collect {PUSH_TIMEOUT}", PUSH_TIMEOUT + 60)["times"]
    if len(times) < devices:
        raise BenchError(f"only {len(times)} of {devices} devices got __force_update__")
    lat = sorted(t - t0 for t in times)
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]  # nearest rank
    return statistics.median(lat), p99, lat[-1]
