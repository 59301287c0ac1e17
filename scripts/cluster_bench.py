"""Measure cross-releaser delivery (issue 15, part 2): a deployment on A reaching B's devices.

Two real ``fleetpush server --insecure`` processes on one PostgreSQL and one
data dir, ``--devices`` simulated devices connected to each
(:mod:`fleetpush.bench.fleet` worker processes, one 127.0.0.x source address
per worker). A deployment of every device (or with ``--push`` an operator
push) is created through A, the leader; each simulated device stamps the
arrival of its ``__force_update__`` with CLOCK_MONOTONIC (shared by every
process). Reported: p50/p99/max arrival after the operator's request, for
A's and B's devices apart, and the bus traffic seen by a LISTEN connection of
this script on the releasers' channel (notifications, bytes, ids) during
the run.

    python scripts/cluster_bench.py --devices 2000 [--push] [--json]

Without ``--database`` (or ``$FLEETPUSH_DATABASE``) a private PostgreSQL is
started (tests/support/fp_pg.py, as scripts/with_postgres.py does). A
measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import DeployCreate
from fleetpush.server import publish_release
from fleetpush.server.cluster_rows import CHANNEL

from fleetpush.bench.baseline import BenchError
from fleetpush.bench.harness import Worker, need_descriptors
from fleetpush.demo.processes import Children
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect

APP = "bench-cluster"
ARRIVAL_TIMEOUT = 120.0


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """``url``, or a fresh database of a private PostgreSQL started for the run."""
    if url:
        yield url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
    from fp_pg import fresh_database, running_cluster

    with running_cluster() as cluster, fresh_database(cluster) as fresh:
        yield fresh


class BusTap:
    """A LISTEN connection of its own on the releasers' channel: what crosses the bus."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")
        self.notes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for n in self.conn.notifies(timeout=0.2):
                self.notes.append((time.monotonic(), n.payload))

    def since(self, t0: float) -> dict[str, Any]:
        notes = [(t, p) for t, p in self.notes if t >= t0]
        if not notes:
            return {"notifies": 0}
        docs = [json.loads(p) for _, p in notes]
        span = max(notes[-1][0] - notes[0][0], 1e-3)
        per_origin: dict[str, int] = {}
        for d in docs:
            per_origin[d["r"]] = per_origin.get(d["r"], 0) + 1
        return {
            "notifies": len(notes),
            "bytes": sum(len(p) for _, p in notes),
            "largest_bytes": max(len(p) for _, p in notes),
            "event_ids": sum(len(d.get("e", ())) for d in docs),
            "push_ids": sum(len(d.get("p", ())) for d in docs),
            "span_s": round(span, 3),
            "notifies_per_s_per_releaser": round(len(notes) / span / max(len(per_origin), 1), 1),
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()


def _figures(times: list[float], t0: float) -> dict[str, Any]:
    lat = sorted(t - t0 for t in times)
    if not lat:
        return {"arrived": 0}
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]  # nearest rank
    return {
        "arrived": len(lat),
        "p50_s": round(lat[len(lat) // 2], 4),
        "p99_s": round(p99, 4),
        "max_s": round(lat[-1], 4),
    }


def run(args: argparse.Namespace, url: str, root: Path) -> dict[str, Any]:
    n = args.devices
    per_worker = args.per_worker
    workers = max(1, math.ceil(n / per_worker))
    need_descriptors(2 * n + 400)
    op_key, rel_key = generate_private_key(), generate_private_key()
    rel_hex = public_bytes(rel_key).hex()
    data_dir = root / "data"
    limit = str(n + 256)
    extra = ["--database", url, "--max-connections", limit, "--max-handshaking", limit]
    extra += ["--max-handshaking-per-source", limit]
    with Children(root / "logs") as children:
        ends = {}
        for name in ("a", "b"):
            _child, host, port = children.start_server(
                data_dir,
                operator_keys=[public_bytes(op_key).hex()],
                insecure=True,
                release_keys=[rel_hex],
                extra=extra,
                name=f"releaser-{name}",
            )
            ends[name] = (host, port)
            if name == "a":
                time.sleep(1.0)  # A takes the leader lock first
        src = root / "src"
        src.mkdir(parents=True)
        (src / "app.txt").write_text("cluster bench\n")
        # The data dir records the database (db.DATABASE_FILE): the rows go there.
        publish_release(data_dir, src, app=APP, version="1.0.0", signing_keys=[rel_key])

        async def approve() -> None:
            async with connect(ends["a"], op_key, name="bench") as op:
                await op.approve(APP, "1.0.0")

        trio.run(approve)
        fleets: dict[str, list[Worker]] = {"a": [], "b": []}
        address = 2
        for name, (host, port) in ends.items():
            share = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]
            for w, count in enumerate(share):
                job = {
                    "host": host,
                    "port": port,
                    "app": APP,
                    "release_key": rel_hex,
                    "devices": count,
                    "prefix": f"{name}{w}",
                    "workdir": str(root / f"fleet-{name}{w}"),
                    "local_address": f"127.0.0.{address}",
                }
                address += 1
                fleets[name].append(Worker(children, f"fleet-{name}{w}", job, root))
        t_connect = time.monotonic()
        connected = {
            name: sum(int(w.read(max(180.0, n * 0.06))["ready"]) for w in ws)
            for name, ws in fleets.items()
        }
        connect_s = time.monotonic() - t_connect
        print(f"{connected} devices connected in {connect_s:.1f}s; settling", file=sys.stderr)
        time.sleep(args.settle)
        tap = BusTap(url)
        try:
            for ws in fleets.values():
                for w in ws:
                    w.ask("arm", 120)

            async def start() -> float:
                async with connect(ends["a"], op_key, name="bench") as op:
                    op.timeout = ARRIVAL_TIMEOUT
                    t0 = time.monotonic()
                    if args.push:
                        await op.push(app=APP, version="1.0.0", mode="force", all=True)
                    else:
                        await op.deploy_create(DeployCreate(app=APP, version="1.0.0", all=True))
                    return t0

            t0 = trio.run(start)
            times: dict[str, list[float]] = {}
            for name, ws in fleets.items():
                times[name] = []
                for w in ws:
                    times[name] += w.ask(f"collect {ARRIVAL_TIMEOUT}", ARRIVAL_TIMEOUT + 60)[
                        "times"
                    ]
            time.sleep(0.5)
            bus = tap.since(t0 - 0.05)
        finally:
            tap.close()
        for ws in fleets.values():
            for w in ws:
                w.quit()
    b = _figures(times["b"], t0)
    return {
        "devices_per_releaser": n,
        "workers_per_releaser": workers,
        "started_by": "push" if args.push else "deployment",
        "connected": connected,
        "connect_s": round(connect_s, 1),
        "a_devices": _figures(times["a"], t0),
        "b_devices": b,
        "bus": bus,
        "targets": {
            "b_p99_at_most_2s": b.get("arrived", 0) >= 0.99 * n and b.get("p99_s", 1e9) <= 2.0
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=5000, help="per releaser (5000)")
    parser.add_argument("--per-worker", type=int, default=5000, help="devices per worker process")
    parser.add_argument("--push", action="store_true", help="an operator push, not a deployment")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after connecting")
    parser.add_argument("--database", default=os.environ.get("FLEETPUSH_DATABASE"))
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    try:
        with database(args.database) as url, tempfile.TemporaryDirectory(prefix="fp-cb-") as tmp:
            doc = run(args, url, Path(tmp))
    except BenchError as e:
        print(f"fleetpush: cluster bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc))
    else:
        for side in ("a_devices", "b_devices"):
            f = doc[side]
            print(
                f"{side}: {f.get('arrived', 0)} arrived  p50 {f.get('p50_s', '-')} s  "
                f"p99 {f.get('p99_s', '-')} s  max {f.get('max_s', '-')} s"
            )
        print("bus:", json.dumps(doc["bus"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
