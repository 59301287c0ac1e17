"""How long the releaser's trio thread stalls on PostgreSQL, runner off vs on (issue 15).

The releaser runs in this process, with a probe task on its event loop that
sleeps 1 ms over and over and records how late it wakes: the time the trio
thread was busy elsewhere (a database round trip made on it, a flush...),
during which no device is served. A worker process (this script with
``--worker``) meanwhile connects DEVICES devices that each send one
``update_progress`` and one ``report_outcomes`` (committed before the
answer, §7.6.1) every second, jittered, and an operator that pages through
``deploy show`` of a 10,000-device deployment (seeded in the database) over
and over. Each run is made twice on the same fresh schema and load:
``database_pool = 0`` (every call on the trio thread, as before
server/db_calls.py) and ``database_pool = POOL`` (the runner). With
``--latency-ms D`` a TCP relay process between the releaser and PostgreSQL
delays every chunk D ms each way (a database one network hop away).

    python scripts/loop_stall_bench.py --devices 200 --seconds 15 --latency-ms 0,1

PostgreSQL is a throwaway cluster (tests/support/fp_pg.py, fsync off: write
figures are a lower bound). Prints one JSON object per run and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

SEEDED = 10_000
APP = "bench"
DEPLOYMENT = "dep-bench"


# --- the PostgreSQL latency relay (a process of its own) --------------------------------


async def _relay(listen_port: int, target_port: int, delay: float) -> None:
    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](10_000)

        async def writer() -> None:
            async for due, data in recv:
                wait = due - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                await dst.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            async with send:
                while data := await src.receive_some(65536):
                    await send.send((trio.current_time() + delay, data))
        await dst.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_tcp(handle, listen_port, host="127.0.0.1")


# --- the load: devices and an operator (a process of its own) -----------------------------


async def _worker(port: int, devices: int, seconds: float, operator_hex: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from fleetpush.client.download import capabilities
    from fleetpush.protocol import PROTOCOL_VERSION, FleetpushError, RpcError
    from fleetpush.protocol.keys import public_bytes
    from fleetpush.protocol.messages import Hello, Outcome, ReportOutcomes, UpdateProgress

    from fleetpush.net.dial import dial
    from fleetpush.net.keys import generate_private_key
    from fleetpush.net.peer import PeerClosed
    from fleetpush.operator import connect

    stop = trio.current_time() + seconds
    acked: list[float] = []
    shows: list[float] = []
    limiter = trio.CapacityLimiter(32)

    failed: list[str] = []

    async def device(i: int) -> None:
        # A device the releaser could not serve in time (handshake or request
        # past its deadline) is counted, as an updater would retry later.
        try:
            await device_run(i)
        except (PeerClosed, RpcError, trio.TooSlowError, OSError) as e:
            failed.append(type(e).__name__)

    async def device_run(i: int) -> None:
        key = generate_private_key()
        hello = Hello(
            protocol_version=PROTOCOL_VERSION, role="device", peer_id=f"w-{i:05d}",
            public_key=public_bytes(key), app=APP, version="1.0.0", channel="stable",
            capabilities=capabilities(),
        )
        async with limiter:
            link_cm = dial(("127.0.0.1", port), key, hello, timeout=60.0)
            link = await link_cm.__aenter__()
        try:
            n = 0
            await trio.sleep(random.random())
            while trio.current_time() < stop:
                n += 1
                await link.peer.notify(
                    "update_progress",
                    UpdateProgress(state="downloading", app=APP, version="2.0.0",
                                   bytes_done=n, bytes_total=1000),
                )
                outcome = Outcome(report_id=f"r{i}-{n}", event="committed", time=time.time(),
                                  state="committed", app=APP, version="2.0.0")
                t = time.perf_counter()
                await link.peer.request(
                    "report_outcomes", ReportOutcomes(reports=[outcome]), timeout=60.0
                )
                acked.append(time.perf_counter() - t)
                await trio.sleep(0.5 + random.random())
        finally:
            await link_cm.__aexit__(None, None, None)

    async def operator() -> None:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(operator_hex))
        async with connect(("127.0.0.1", port), key, name="bench") as op:
            await trio.sleep(1.0)
            while trio.current_time() < stop:
                t = time.perf_counter()
                try:
                    info = await op.deploy_show(DEPLOYMENT)
                except FleetpushError as e:  # past the operator's deadline: counted
                    failed.append(f"deploy show: {e!r}")
                    continue
                assert len(info.devices) == SEEDED
                shows.append(time.perf_counter() - t)

    async with trio.open_nursery() as nursery:
        for i in range(devices):
            nursery.start_soon(device, i)
        nursery.start_soon(operator)
    print(json.dumps({
        "devices_failed": len(failed),
        "reports": len(acked),
        "report_p50_ms": _ms(statistics.median(acked)) if acked else None,
        "report_p99_ms": _ms(_pct(acked, 99)) if acked else None,
        "shows": len(shows),
        "show_p50_ms": _ms(statistics.median(shows)) if shows else None,
    }), flush=True)


# --- the releaser and the probe (this process) ----------------------------------------------


def _seed(url: str, tmp: Path) -> None:
    from fleetpush.server import db

    conn = db.open_database(tmp / "seed", url)
    with db.transaction(conn):
        conn.executemany(
            "INSERT INTO devices (device_id, public_key, enrollment, app, version, first_seen,"
            " last_seen) VALUES (?, ?, 'accepted', ?, '1.0.0', 1, 1)",
            [(f"d{i:05d}", b"k" * 32, APP) for i in range(SEEDED)],
        )
        conn.execute(
            "INSERT INTO deployments (deployment_id, created, operator, app, version, selector,"
            " phases, phase, phase_started, max_concurrent, min_executed, on_halt,"
            " device_timeout, state, updated) VALUES (?, 1, 'bench', ?, '2.0.0', '{}', ?, 0, 1,"
            " 0, 1, 'pause', 3600, 'paused', 1)",
            (DEPLOYMENT, APP, json.dumps([SEEDED])),
        )
        conn.executemany(
            "INSERT INTO deployment_devices (deployment_id, device_id, ord, phase, state)"
            " VALUES (?, ?, ?, 0, 'pending')",
            [(DEPLOYMENT, f"d{i:05d}", i) for i in range(SEEDED)],
        )
    conn.close()


async def _measure(url: str, pool: int, devices: int, seconds: float, tmp: Path) -> dict[str, Any]:
    from fleetpush.protocol.keys import public_bytes
    from fleetpush.server import ServerConfig, serve

    from fleetpush.net.keys import generate_private_key

    op_key = generate_private_key()
    config = ServerConfig(
        data_dir=tmp / f"data-{pool}", database=url, database_pool=pool, port=0,
        operator_keys=[public_bytes(op_key)], grace_period=1.0, max_connections=devices + 100,
        max_handshaking_per_source=64,
    )
    late: list[float] = []
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config)
        probing = True

        async def probe() -> None:
            while probing:
                t = time.perf_counter()
                await trio.sleep(0.001)
                late.append(time.perf_counter() - t - 0.001)

        nursery.start_soon(probe)
        worker = await trio.run_process(
            [sys.executable, __file__, "--worker", str(handle.port), str(devices), str(seconds),
             op_key.private_bytes_raw().hex()],
            capture_stdout=True, check=True,
        )
        probing = False
        await handle.shutdown()
    load = json.loads(worker.stdout.decode().strip().splitlines()[-1])
    return {
        "database_pool": pool,
        "stall_max_ms": _ms(max(late)),
        "stall_p99_ms": _ms(_pct(late, 99)),
        "stall_p999_ms": _ms(_pct(late, 99.9)),
        "stalls_over_10ms": sum(1 for x in late if x > 0.010),
        "probe_samples": len(late),
        **load,
    }


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def main() -> None:
    if sys.argv[1:2] == ["--relay"]:
        listen, target, delay_ms = sys.argv[2:5]
        trio.run(_relay, int(listen), int(target), float(delay_ms) / 1000)
        return
    if sys.argv[1:2] == ["--worker"]:
        port, devices, seconds, key = sys.argv[2:6]
        trio.run(_worker, int(port), int(devices), float(seconds), key)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--latency-ms", default="0,1", help="comma-separated one-way delays")
    parser.add_argument(
        "--switch-interval", type=float, default=None,
        help="sys.setswitchinterval for the releaser (default Python's 5 ms): how long a "
        "thread building rows may keep the GIL from the event loop and the other threads",
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    from fp_pg import fresh_database, running_cluster

    rows = []
    with running_cluster() as cluster:
        for delay in [float(x) for x in args.latency_ms.split(",")]:
            for pool in (0, args.pool):
                with fresh_database(cluster) as url, tempfile.TemporaryDirectory() as tmp:
                    _seed(url, Path(tmp))
                    relay = None
                    if delay > 0:
                        port = _free_port()
                        relay = subprocess.Popen(
                            [sys.executable, __file__, "--relay", str(port),
                             str(cluster.port), str(delay)]
                        )
                        url = url.replace(f":{cluster.port}/", f":{port}/")
                        time.sleep(0.5)
                    try:
                        row = trio.run(
                            _measure, url, pool, args.devices, args.seconds, Path(tmp)
                        )
                    finally:
                        if relay is not None:
                            relay.terminate()
                            relay.wait()
                    row = {"latency_ms_each_way": delay, "devices": args.devices, **row}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(f"{'delay':>5} {'pool':>4} {'max ms':>8} {'p99 ms':>7} {'p99.9':>7} {'>10ms':>6} "
          f"{'failed':>6} {'reports':>7} {'rep p99':>8} {'shows':>5} {'show p50':>8}")
    for r in rows:
        print(f"{r['latency_ms_each_way']:>5} {r['database_pool']:>4} {r['stall_max_ms']:>8} "
              f"{r['stall_p99_ms']:>7} {r['stall_p999_ms']:>7} {r['stalls_over_10ms']:>6} "
              f"{r['devices_failed']:>6} {r['reports']:>7} {r['report_p99_ms']!s:>8} "
              f"{r['shows']:>5} {r['show_p50_ms']!s:>8}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    os.environ.pop("FLEETPUSH_DATABASE", None)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    main()
