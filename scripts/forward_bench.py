"""Measure a forwarded operator call (issue 15, part 2; server/cluster_calls.py).

Two releasers on one PostgreSQL (in this process, as tests/cluster does) and
one real ``fleetpush agent`` connected to B. Times ``app_logs`` (a tail of 5
lines) asked of B directly and of A (forwarded: a row, a NOTIFY each way, the
answer row), one call at a time 0.3 s apart (no batching) and then
``--burst`` calls at once through A (calls announced within 100 ms of another
are batched: at most one BATCH_INTERVAL each way). Prints p50/p99/max in ms.

    python scripts/forward_bench.py [--calls 100] [--burst 20] [--database URL] [--json]

A measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "tests" / "cluster")]

from cluster_bench import database  # noqa: E402
from cluster_helpers import two_releasers, until  # noqa: E402
from fp_agent import AgentDevice  # noqa: E402
from fp_keys import OPERATOR_KEY  # noqa: E402

from fleetpush.operator import OperatorClient  # noqa: E402
from fleetpush.operator import connect as operator_connect  # noqa: E402

TICKER = [sys.executable, "-u", "-c", "import time\nwhile True:\n print('x');time.sleep(0.05)"]


def _figures(ms: list[float]) -> dict[str, Any]:
    ms = sorted(ms)
    return {
        "n": len(ms),
        "p50_ms": round(ms[len(ms) // 2], 1),
        "p99_ms": round(ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)], 1),
        "max_ms": round(ms[-1], 1),
    }


async def _one(op: OperatorClient) -> float:
    t0 = time.perf_counter()
    await op.app_logs("d1", 5)
    return (time.perf_counter() - t0) * 1000


async def run(url: str, calls: int, burst: int) -> dict[str, Any]:
    os.environ["FLEETPUSH_DATABASE"] = url
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with two_releasers(root / "data", url) as (a, b):
            dev = AgentDevice(root / "d1", b.port, device_id="d1")
            await dev.start_agent(TICKER)
            try:
                await dev.wait_owner(timeout=60)
                await until(lambda: "d1" in b.services.fleet)
                await until(lambda: a.services.leases.holders(["d1"], time.time()).get("d1"))
                out: dict[str, Any] = {}
                for name, port in (("direct_on_b", b.port), ("forwarded_via_a", a.port)):
                    async with operator_connect(("127.0.0.1", port), OPERATOR_KEY) as op:
                        await _one(op)  # warm up
                        times = []
                        for _ in range(calls):
                            times.append(await _one(op))
                            await trio.sleep(0.3)
                        out[name] = _figures(times)
                async with operator_connect(("127.0.0.1", a.port), OPERATOR_KEY) as op:
                    times = []

                    async def timed() -> None:
                        times.append(await _one(op))

                    async with trio.open_nursery() as nursery:
                        for _ in range(burst):
                            nursery.start_soon(timed)
                    out[f"forwarded_burst_of_{burst}"] = _figures(times)
                assert a.services.cluster is not None
                out["a_calls"] = {
                    k: v for k, v in attrs.asdict(a.services.cluster.calls.figures).items() if v
                }
                return out
            finally:
                await dev.stop_agents()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--database", default=os.environ.get("FLEETPUSH_DATABASE"))
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    with database(args.database) as url:
        result = trio.run(run, url, args.calls, args.burst)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
