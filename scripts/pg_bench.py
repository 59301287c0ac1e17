"""How the releaser's storage layer should call PostgreSQL from trio (issue 15), measured.

    python scripts/pg_bench.py [--seconds 3] [--pool 16] [--tasks 1,16,256] [--fast]

Starts a throwaway PostgreSQL cluster of Debian's binaries on 127.0.0.1
(tests/support/fp_pg.py; nothing else is contacted; stopped and deleted at
the end), seeds 10,000 devices, and measures synchronous psycopg 3 +
psycopg_pool called through ``trio.to_thread.run_sync`` under a
``trio.CapacityLimiter`` sized to the pool. Each scenario runs N concurrent
trio tasks for ``--seconds``; latency is seen from the trio task (limiter
wait + thread hop + pool checkout + round trips). One JSON object per line:

- hop: ``to_thread.run_sync`` of a no-op (the floor every call pays);
- single: the releaser's query mix, one statement per thread hop, autocommit:
  a SELECT of one device by primary key, an UPDATE of one device row, an
  INSERT into the append-only events table, in turn;
- txn3: the three statements of the mix in one transaction per hop;
- pipe30: ten mixes (30 statements) per hop, one transaction, psycopg's
  pipeline mode (no round trip per statement);
- single_lim2x, txn3_lim2x, single_lim40, txn3_lim40 (highest N only): as
  single and txn3, but with a limiter twice the pool, or trio's default (40
  threads), instead of one sized to the pool: the extra threads wait inside
  the pool, ready to take a connection the moment it is handed back;
- notify: one NOTIFY every 100 ms with 100..7990 bytes of device ids, received
  by a listening connection in a thread that hands each one to trio
  (``trio.from_thread.run_sync`` into a memory channel); delivery latency,
  idle and under the N=256 single load.

By default the cluster is durable (fsync and synchronous_commit on, as in
production); ``--fast`` turns those off, as the tests do. Stops by itself:
every scenario is bounded by ``--seconds`` or by its count.

Measured 2026-12-04, PostgreSQL 15 on this 2-core machine shared with other
work (load average 10-16, so +-30% between runs), three runs each, pool 16:

- hop: p50 0.04 ms, i.e. ~10% of the fastest loopback statement (0.34-0.58
  ms, --fast, N=1) and ~1% of a durable commit (2.6-4 ms p50 at N=1).
- single: 2.2-3.5k statements/s at N=16, 1.7-3.2k at N=256 (past the pool
  size only queueing grows: p50 50-150 ms at N=256).
- txn3: 3.6-7.0k statements/s at N=16; pipe30: 11-21k statements/s.
- limiter 2x pool or 40 at N=256, single: -5% to +77% over limiter = pool;
  txn3: no consistent difference.
- pool 16 vs 8 vs 4 (durable, single, N=16): 2.2-3.5k vs 1.6k vs 1.2k/s
  (more connections, more commits share an fsync).
- notify: p50 1.0-2.2 ms, idle or under N=256 load, 7990-byte payloads
  included; p99 8-141 ms (the loaded machine's scheduling).

So the storage layer should: keep sync psycopg + psycopg_pool behind
trio.to_thread (the hop is not the cost); make one storage call one
transaction and one hop, never one hop per statement; batch the hot writes
(device progress and state) into one hop in pipeline mode; size the limiter
to the pool so waiting stays in trio, cancellable, and bound each call with
statement_timeout and the pool's timeout (a thread cannot be abandoned
mid-statement); and LISTEN on its own connection in one long-lived thread
outside the limiter, handing notifications to trio through a bounded memory
channel (coalescing to "reload" when it is full).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from fp_pg import TEST_SETTINGS, running_cluster  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402

DEVICES = 10_000
SCHEMA = """
CREATE TABLE devices (
    id text PRIMARY KEY,
    seq bigint NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'idle',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE events (
    id bigserial PRIMARY KEY,
    device_id text NOT NULL,
    kind text NOT NULL,
    body bytea NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_device ON events (device_id, id);
"""
SELECT = "SELECT seq, state FROM devices WHERE id = %s"
UPDATE = "UPDATE devices SET seq = seq + 1, state = %s, updated_at = now() WHERE id = %s"
INSERT = "INSERT INTO events (device_id, kind, body) VALUES (%s, %s, %s)"
EVENT_BODY = bytes(200)

DURABLE: Mapping[str, str] = {"max_connections": "300"}


def device() -> str:
    return f"dev-{random.randrange(DEVICES):05d}"


def one_statement(pool: ConnectionPool, i: int) -> int:
    """The i-th statement of the mix, alone, in autocommit."""
    with pool.connection() as conn:
        kind = i % 3
        if kind == 0:
            conn.execute(SELECT, (device(),)).fetchone()
        elif kind == 1:
            conn.execute(UPDATE, ("staged", device()))
        else:
            conn.execute(INSERT, (device(), "progress", EVENT_BODY))
    return 1


def mix_in_transaction(pool: ConnectionPool, _i: int) -> int:
    with pool.connection() as conn, conn.transaction():
        dev = device()
        conn.execute(SELECT, (dev,)).fetchone()
        conn.execute(UPDATE, ("staged", dev))
        conn.execute(INSERT, (dev, "progress", EVENT_BODY))
    return 3


def mixes_pipelined(pool: ConnectionPool, _i: int, mixes: int = 10) -> int:
    with pool.connection() as conn, conn.transaction(), conn.pipeline():
        cursors = []
        for _ in range(mixes):
            dev = device()
            cursors.append(conn.execute(SELECT, (dev,)))
            conn.execute(UPDATE, ("staged", dev))
            conn.execute(INSERT, (dev, "progress", EVENT_BODY))
        for cur in cursors:
            cur.fetchone()
    return 3 * mixes


def nothing(_pool: ConnectionPool, _i: int) -> int:
    return 0


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


async def run_load(
    pool: ConnectionPool,
    work: Callable[[ConnectionPool, int], int],
    tasks: int,
    seconds: float,
    limiter: trio.CapacityLimiter | None,
) -> dict[str, Any]:
    """``tasks`` trio tasks calling ``work`` through to_thread for ``seconds``."""
    latencies: list[float] = []
    statements = 0
    deadline = trio.current_time() + seconds

    async def one_task(k: int) -> None:
        nonlocal statements
        i = k
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            done = await trio.to_thread.run_sync(work, pool, i, limiter=limiter)
            # Not `statements += await ...`: that reads the total before the
            # await and would lose the other tasks' updates.
            statements += done
            latencies.append(time.perf_counter() - t0)
            i += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(tasks):
            nursery.start_soon(one_task, k)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "tasks": tasks,
        "calls_per_s": round(len(latencies) / elapsed),
        "statements_per_s": round(statements / elapsed),
        "p50_ms": round(pct(latencies, 0.50) * 1000, 3),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 3),
    }


async def notify_latency(
    pool: ConnectionPool, url: str, count: int, load_tasks: int, seconds_per_load: float
) -> dict[str, Any]:
    """``count`` NOTIFYs 100 ms apart; latency until a trio task holds each one."""
    import psycopg

    send, receive = trio.open_memory_channel[tuple[float, int, float]](count + 16)
    stop = False
    listening = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def listen() -> None:
        # A dedicated connection and thread: conn.notifies() blocks, so it must
        # never hold a slot of the pool's limiter. The timeout lets it see `stop`.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("LISTEN fleet_changes")
            trio.from_thread.run_sync(listening.set, trio_token=token)
            while not stop:
                for n in conn.notifies(timeout=0.2):
                    sent = float(n.payload.split(";", 1)[0])
                    size = len(n.payload.encode())
                    trio.from_thread.run_sync(
                        send.send_nowait, (sent, size, time.perf_counter()), trio_token=token
                    )

    sizes = [100, 1000, 4000, 7990]
    ids = ",".join(f"dev-{i:05d}" for i in range(DEVICES))

    def notify(i: int) -> None:
        size = sizes[i % len(sizes)]
        head = f"{time.perf_counter():.9f};"
        with pool.connection() as conn:
            conn.execute("SELECT pg_notify('fleet_changes', %s)", (head + ids[: size - len(head)],))

    limiter = trio.CapacityLimiter(pool.max_size)
    results: list[tuple[int, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trio.to_thread.run_sync(listen, limiter=trio.CapacityLimiter(1))
        )
        await listening.wait()
        if load_tasks:
            nursery.start_soon(
                run_load, pool, one_statement, load_tasks, count * 0.1 + 1, limiter
            )
        for i in range(count):
            await trio.to_thread.run_sync(notify, i, limiter=limiter)
            await trio.sleep(0.1)
        try:
            with trio.fail_after(10):
                for _ in range(count):
                    sent, size, got = await receive.receive()
                    results.append((size, got - sent))
        finally:
            stop = True
    lat = sorted(d for _, d in results)
    big = sorted(d for s, d in results if s >= 7000)
    return {
        "under_load_tasks": load_tasks,
        "notifies": len(results),
        "p50_ms": round(pct(lat, 0.5) * 1000, 3),
        "p99_ms": round(pct(lat, 0.99) * 1000, 3),
        "max_ms": round(lat[-1] * 1000, 3),
        "p50_ms_7990_bytes": round(pct(big, 0.5) * 1000, 3),
    }


def seed(url: str) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute(SCHEMA)
        with conn.cursor().copy("COPY devices (id) FROM STDIN") as copy:
            for i in range(DEVICES):
                copy.write_row((f"dev-{i:05d}",))
        conn.commit()
        conn.execute("ANALYZE")


async def bench(url: str, args: argparse.Namespace) -> None:
    def emit(scenario: str, row: dict[str, Any]) -> None:
        print(json.dumps({"scenario": scenario, "pool": args.pool, **row}), flush=True)

    with ConnectionPool(
        url, min_size=args.pool, max_size=args.pool, kwargs={"autocommit": True}, open=True
    ) as pool:
        pool.wait(timeout=30)
        limiter = trio.CapacityLimiter(args.pool)
        emit("hop", await run_load(pool, nothing, 1, args.seconds, limiter))
        for name, work in (
            ("single", one_statement),
            ("txn3", mix_in_transaction),
            ("pipe30", mixes_pipelined),
        ):
            for n in args.tasks:
                emit(name, await run_load(pool, work, n, args.seconds, limiter))
        # The limiter's size against the pool's, at the highest concurrency:
        # twice the pool keeps a thread waiting at the pool for each
        # connection handed back; None is trio's default limiter (40 threads).
        n = max(args.tasks)
        for label, lim in (("lim2x", trio.CapacityLimiter(2 * args.pool)), ("lim40", None)):
            emit(f"single_{label}", await run_load(pool, one_statement, n, args.seconds, lim))
            emit(f"txn3_{label}", await run_load(pool, mix_in_transaction, n, args.seconds, lim))
        for load in (0, 256):
            emit("notify", await notify_latency(pool, url, args.notifies, load, args.seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per scenario")
    ap.add_argument("--pool", type=int, default=16, help="pool size = limiter size")
    ap.add_argument("--tasks", default="1,16,256", help="concurrent trio tasks, comma-separated")
    ap.add_argument("--notifies", type=int, default=60, help="NOTIFYs per notify scenario")
    ap.add_argument("--fast", action="store_true", help="fsync and synchronous_commit off")
    args = ap.parse_args()
    args.tasks = [int(n) for n in args.tasks.split(",")]
    settings = TEST_SETTINGS if args.fast else DURABLE
    with running_cluster(settings) as cluster:
        url = cluster.url("postgres")
        seed(url)
        cpus = os.cpu_count()
        print(json.dumps({"cluster": "fast" if args.fast else "durable", "cpus": cpus}), flush=True)
        trio.run(bench, url, args)


if __name__ == "__main__":
    main()
