"""How fast the operator's fleet views answer on a big registry (issue 13, target 2).

Fills a fresh data dir with ``--devices`` accepted devices (default 10,000),
``--events`` stored events (default 1,000,000, spread over the devices and
over the last 60 days) and a push per 10 devices, starts a real releaser on
127.0.0.1 over it, and times, through the real operator client over TCP,
``get_device`` (what `fleetpush devices show` asks), ``list_events`` for one
device (`events --device`), for one kind, and since an hour ago, and one page
of ``list_devices`` with a filter. Each is asked ``--rounds`` times for
different devices; medians with min-max, in milliseconds. The target is
200 ms for each.

``--backend postgres`` runs the same over PostgreSQL (issue 15): a throwaway
cluster from tests/support/fp_pg.py, or the database ``--database URL``
names (it must be empty); ``--explain`` prints PostgreSQL's plans of the
fleet-view queries, to check each walks an index.

    python scripts/fleet_views_bench.py [--devices N] [--events N] [--rounds N] [--json]
        [--backend sqlite|postgres] [--database URL] [--explain]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import DeviceFilter, EventFilter
from fleetpush.server import ServerConfig, db, serve

from fleetpush.operator import connect

KINDS = ("progress", "connected", "disconnected", "app_status", "report")
STATES = ("committed", "downloading", "trial", "failed", "idle")


#: The fleet-view queries as the stores send them (events.py, registry.py,
#: deployments.py), for --explain.
EXPLAINED = {
    "events by device": "SELECT * FROM events WHERE 1 = 1 AND device_id = ?"
    " ORDER BY seq DESC LIMIT ?",
    "events by kind": "SELECT * FROM events WHERE 1 = 1 AND kind IN (?) ORDER BY seq DESC LIMIT ?",
    "events by push": "SELECT * FROM events INDEXED BY events_push WHERE 1 = 1"
    " AND json_extract(data, '$.push_id') = ? ORDER BY seq DESC LIMIT ?",
    "events since": "SELECT * FROM events WHERE 1 = 1 AND time >= ? ORDER BY seq DESC LIMIT ?",
    "devices by state": "SELECT * FROM devices WHERE 1 = 1 AND state = ? ORDER BY device_id"
    " LIMIT ?",
    "deployment devices": "SELECT * FROM deployment_devices WHERE deployment_id = ? ORDER BY ord",
}


def explain(database: str) -> dict[str, str]:
    """PostgreSQL's plan of each EXPLAINED query (one line each)."""
    conn = db.open_database(Path("/nonexistent"), database)
    args = {
        "events by device": ("dev-00001", 101),
        "events by kind": ("progress", 101),
        "events by push": ("push-1", 101),
        "events since": (time.time() - 3600, 101),
        "devices by state": ("trial", 101),
        "deployment devices": ("dep-1",),
    }
    plans = {}
    for name, sql in EXPLAINED.items():
        rows = conn.execute("EXPLAIN " + sql, args[name]).fetchall()
        plans[name] = " | ".join(str(r[0]).strip() for r in rows[:5])
    conn.close()
    return plans


@contextlib.contextmanager
def backend_database(args: argparse.Namespace) -> Iterator[str | None]:
    """None (SQLite in the data dir), --database, or a throwaway PostgreSQL's URL."""
    if args.backend == "sqlite":
        yield None
    elif args.database:
        yield args.database
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
        from fp_pg import fresh_database, running_cluster

        with running_cluster() as cluster, fresh_database(cluster) as url:
            yield url


def fill(data_dir: Path, devices: int, events: int, database: str | None = None) -> float:
    """Write the registry and the history straight into the database; seconds taken."""
    start = time.perf_counter()
    conn = db.open_database(data_dir, database)
    now = time.time()
    rng = random.Random(7)
    with db.transaction(conn):
        conn.executemany(
            "INSERT INTO devices (device_id, public_key, enrollment, app, version, channel,"
            " grp, sequence, state, first_seen, last_seen) VALUES (?, ?, 'accepted', 'sensor',"
            " ?, 'stable', ?, 1, ?, ?, ?)",
            [
                (f"dev-{i:05d}", bytes(32), f"1.{i % 4}.0", f"site-{i % 50}",
                 STATES[i % len(STATES)], now - 86400, now - i)
                for i in range(devices)
            ],
        )
        conn.executemany(
            "INSERT INTO pushes (push_id, created, operator, app, version, mode, restart,"
            " selector) VALUES (?, ?, 'ops', 'sensor', '1.3.0', 'force', 1, '{}')",
            [(f"push-{i}", now - 3600) for i in range(devices // 10)],
        )
        conn.executemany(
            "INSERT INTO push_targets (push_id, device_id, state, updated) VALUES (?, ?,"
            " 'accepted', ?)",
            [(f"push-{i // 10}", f"dev-{i:05d}", now - 3600) for i in range(devices // 10 * 10)],
        )
        # A finished deployment over every device (what `deploy show` reads).
        conn.execute(
            "INSERT INTO deployments (deployment_id, created, operator, app, version, selector,"
            " phases, phase, phase_started, max_concurrent, failure_percent, min_executed,"
            " on_halt, phase_wait, device_timeout, restart, state, updated) VALUES ('dep-1', ?,"
            " 'ops', 'sensor', '1.3.0', '{}', ?, 3, ?, 100, 5.0, 20, 'pause', NULL, 900, 1,"
            " 'completed', ?)",
            (now - 3600, json.dumps([devices // 100, devices // 10, devices // 2, devices]),
             now - 3600, now),
        )
        conn.executemany(
            "INSERT INTO deployment_devices (deployment_id, device_id, ord, phase, state, reason,"
            " push_id, started, finished) VALUES ('dep-1', ?, ?, ?, 'succeeded',"
            " 'committed 1.3.0', ?, ?, ?)",
            [(f"dev-{i:05d}", i, 0 if i < devices // 100 else 1 if i < devices // 10 else 2
              if i < devices // 2 else 3, f"push-{i // 10}", now - 3000, now - 2900)
             for i in range(devices)],
        )
    batch = 50_000
    span = 60 * 86400
    for first in range(0, events, batch):
        rows = []
        for seq in range(first + 1, min(events, first + batch) + 1):
            dev = rng.randrange(devices)
            kind = KINDS[seq % len(KINDS)]
            data = {"state": STATES[seq % len(STATES)], "version": "1.3.0"}
            if kind == "progress":
                data["push_id"] = f"push-{dev // 10}"
            rows.append((seq, now - span + span * seq / events, kind, f"dev-{dev:05d}",
                         json.dumps(data)))
        with db.transaction(conn):
            conn.executemany(
                "INSERT INTO events (seq, time, kind, device_id, data) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - start


async def timed(rounds: int, ask: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    times = []
    for i in range(rounds):
        t = time.perf_counter()
        await ask(i)
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2)}


async def run(args: argparse.Namespace) -> dict[str, object]:
    with (
        tempfile.TemporaryDirectory(prefix="fp-views-") as tmp,
        backend_database(args) as database,
    ):
        data_dir = Path(tmp) / "data"
        filled = fill(data_dir, args.devices, args.events, database)
        plans = explain(database) if args.explain and database else {}
        key = Ed25519PrivateKey.generate()
        # history_limit above the filled count: the bench measures, it must not prune.
        config = ServerConfig(
            data_dir=data_dir, port=0, operator_keys=[public_bytes(key)],
            history_limit=max(args.events * 2, 100), grace_period=1.0, database=database,
        )
        rng = random.Random(1)
        ids = [f"dev-{rng.randrange(args.devices):05d}" for _ in range(args.rounds)]
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            async with connect(("127.0.0.1", handle.port), key, name="bench") as op:
                results = {
                    "get_device (devices show)": await timed(
                        args.rounds, lambda i: op.get_device(ids[i], history=30)
                    ),
                    "list_events device (events --device)": await timed(
                        args.rounds,
                        lambda i: op.call("list_events", EventFilter(device_id=ids[i], limit=100)),
                    ),
                    "list_events kind": await timed(
                        args.rounds,
                        lambda i: op.call(
                            "list_events", EventFilter(kinds=[KINDS[i % len(KINDS)]], limit=100)
                        ),
                    ),
                    "list_events push": await timed(
                        args.rounds,
                        lambda i: op.call(
                            "list_events",
                            EventFilter(push_id=f"push-{int(ids[i][4:]) // 10}", limit=100),
                        ),
                    ),
                    "list_events since 1h": await timed(
                        args.rounds,
                        lambda i: op.call(
                            "list_events", EventFilter(since=time.time() - 3600, limit=100)
                        ),
                    ),
                    "deploy_show, every device (deploy show)": await timed(
                        max(3, args.rounds // 4), lambda i: op.deploy_show("dep-1")
                    ),
                    "list_devices state page": await timed(
                        args.rounds,
                        lambda i: op.call(
                            "list_devices", DeviceFilter(state=STATES[i % len(STATES)])
                        ),
                    ),
                }
            await handle.shutdown()
    return {
        "backend": args.backend,
        "plans": plans,
        "devices": args.devices,
        "events": args.events,
        "rounds": args.rounds,
        "fill_seconds": round(filled, 1),
        "target_ms": 200,
        "results": results,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--database", help="postgresql:// URL of an empty database (--backend postgres)")
    p.add_argument("--explain", action="store_true", help="print PostgreSQL's query plans")
    args = p.parse_args()
    out = trio.run(run, args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, plan in out["plans"].items():  # type: ignore[attr-defined]
            print(f"  plan {name}: {plan}")
        print(f"{out['backend']}: {out['devices']} devices, {out['events']} events (filled in "
              f"{out['fill_seconds']} s), {out['rounds']} rounds; target 200 ms")
        for name, r in out["results"].items():  # type: ignore[attr-defined]
            print(f"  {name:<40} median {r['median_ms']:7.2f} ms  "
                  f"(min {r['min_ms']:.2f}, max {r['max_ms']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
