"""kill -9 of one of two releasers on one PostgreSQL: its devices' move to the other (issue 15, §4).

Two real ``fleetpush server`` processes (port 0, ``--database`` one
PostgreSQL: ``--database URL``, or a throwaway cluster started here with
tests/support/fp_pg.py; one data dir for the release files), and
``--devices`` simulated devices in this process: the device's own link code
(:class:`fleetpush.client.session.ReleaserLink`) with both addresses and the
default jittered failover (client/failover.py), ids picked so that each tries
A first. A push of a small release to all of them is acknowledged (accepted,
not finished: the simulated devices report no progress), then A is killed
with SIGKILL. Reported: how long each device took to be connected to B
(p50/p99/max), how long until B offered it the unfinished push again (the
rows follow the device), whether every lease now names B, and the rows of
pushes, push targets, reports and devices before and after (none lost, none
twice).

    python scripts/failover_kill.py --devices 2000 --json

A measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from fleetpush.client.config import UpdaterConfig
from fleetpush.client.failover import device_order
from fleetpush.client.session import ReleaserLink
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Ack, Hello, UpdateCommand
from fleetpush.server import db, publish_release
from fleetpush.server.releases import ReleaseStore

from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect as operator_connect

HERE = Path(__file__).resolve().parent


def start_releaser(
    data_dir: Path, database: str, devices: int, op_key: str, log: Path
) -> tuple[Any, str]:
    with log.open("w") as err:
        proc = _popen(data_dir, database, devices, op_key, err)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc, f"127.0.0.1:{line.rsplit(':', 1)[1].strip()}"
    raise SystemExit(f"fleetpush: failover_kill: a releaser did not start [see {log}]")


def _popen(data_dir: Path, database: str, devices: int, op_key: str, err: Any) -> Any:
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "fleetpush.cli.main", "server",
         "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--insecure",
         "--database", database, "--operator-key", op_key,
         "--max-connections", str(devices + 64),
         "--max-handshaking", str(max(256, devices // 4)),
         "--max-handshaking-per-source", str(devices + 16)],
        stdout=subprocess.PIPE, stderr=err, text=True,
    )  # fmt: skip


def pick_ids(n: int, first: str, servers: list[str]) -> list[str]:
    """``n`` device ids whose own failover order tries ``first`` first."""
    ids: list[str] = []
    i = 0
    while len(ids) < n:
        device_id = f"fk-{i:06d}"
        if device_order(servers, device_id)[0] == first:
            ids.append(device_id)
        i += 1
    return ids


class SimDevice:
    """One simulated device: its link, and when B (re)offered it the push."""

    def __init__(self, device_id: str, servers: list[str], base: Path, spread: float) -> None:
        self.device_id = device_id
        self.commands: list[tuple[str, float]] = []  # (push_id, trio time)
        cfg = UpdaterConfig(
            app="demo",
            device_id=device_id,
            state_dir=base / device_id / "state",
            app_root=base / device_id / "app",
            server=tuple(servers),
            trusted_keys=(),
            insecure=True,
            reconnect_spread=spread,
        )
        key = generate_private_key()
        hello = Hello(
            protocol_version=PROTOCOL_VERSION, role="device", peer_id=device_id,
            public_key=public_bytes(key), app="demo", version="1.0", channel="stable",
        )  # fmt: skip
        self.link = ReleaserLink(
            cfg, key, hello=lambda: hello, on_command=self._command, rng=random.Random(device_id)
        )

    async def _command(self, method: str, cmd: UpdateCommand) -> Ack:
        self.commands.append((cmd.push_id, trio.current_time()))
        return Ack(accepted=True)


def snapshot(url: str) -> dict[str, Any]:
    """The rows that must survive the kill, read through a connection of our own."""
    conn = db.open_database(Path(tempfile.gettempdir()), url)
    try:
        q = conn.execute
        return {
            "pushes": sorted(tuple(r) for r in q("SELECT push_id, app, version FROM pushes")),
            "push_targets": sorted(
                tuple(r) for r in q("SELECT id, push_id, device_id FROM push_targets")
            ),
            "reports": sorted(tuple(r) for r in q("SELECT device_id, report_id FROM reports")),
            "devices": sorted(str(r[0]) for r in q("SELECT device_id FROM devices")),
            "no_lease": sorted(
                str(r[0])
                for r in q(
                    "SELECT device_id FROM devices WHERE device_id NOT IN"
                    " (SELECT device_id FROM device_leases)"
                )
            ),
            "leases": dict(
                (str(r[0]), int(r[1]))
                for r in q(
                    "SELECT r.address, COUNT(*) FROM device_leases l"
                    " JOIN releasers r ON r.releaser_id = l.releaser_id GROUP BY r.address"
                )
            ),
        }
    finally:
        conn.close()


def quantiles(times: list[float]) -> dict[str, float | None]:
    if not times:
        return {"p50": None, "p99": None, "max": None}
    s = sorted(times)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 2)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(s[-1], 2)}


async def wait_until(pred: Any, deadline: float, step: float = 0.05) -> bool:
    with trio.move_on_after(deadline):
        while not pred():
            await trio.sleep(step)
        return True
    return False


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    op_key = generate_private_key()
    with tempfile.TemporaryDirectory(prefix="fp-kill-") as tmp:
        base = Path(tmp)
        data = base / "data"
        src = base / "src"
        src.mkdir()
        (src / "app.txt").write_text("2.0\n")
        os.environ["FLEETPUSH_DATABASE"] = url  # publish writes the release rows there
        publish_release(data, src, app="demo", version="2.0", signing_keys=[])
        store = ReleaseStore.open(data)
        try:
            store.set_status("demo", "2.0", "pre-released", "bench")
            store.set_status("demo", "2.0", "approved", "bench")
        finally:
            store.close()
        op_hex = public_bytes(op_key).hex()
        logs = Path(args.logs) if args.logs else base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        a, addr_a = start_releaser(data, url, args.devices, op_hex, logs / "releaser-a.log")
        b, addr_b = start_releaser(data, url, args.devices, op_hex, logs / "releaser-b.log")
        try:
            servers = [addr_a, addr_b]
            devs = [SimDevice(d, servers, base, args.spread)
                    for d in pick_ids(args.devices, addr_a, servers)]  # fmt: skip
            async with trio.open_nursery() as nursery:
                for dev in devs:
                    nursery.start_soon(dev.link.run)
                t = trio.current_time()
                # A device refused by A's admission budgets (a herd of handshakes)
                # goes on to B and stays there (stickiness): only those on A count.
                if not await wait_until(lambda: all(d.link.releaser for d in devs), 600):
                    raise SystemExit("fleetpush: failover_kill: the devices did not all connect")
                connect_s = trio.current_time() - t
                started_on_b = sum(d.link.releaser == addr_b for d in devs)
                devs = [d for d in devs if d.link.releaser == addr_a]
                port_a = int(addr_a.rsplit(":", 1)[1])
                async with operator_connect(("127.0.0.1", port_a), op_key) as op:
                    push = await op.push(app="demo", version="2.0", all=True)
                await wait_until(lambda: all(d.commands for d in devs), 120)
                await trio.sleep(1.0)  # A's queued writes (acks) flushed: WriteBehind, 100 ms
                before = snapshot(url)
                offered_on_a = {d.device_id: len(d.commands) for d in devs}

                killed_at = trio.current_time()
                a.kill()
                moved: dict[str, float] = {}
                reoffered: dict[str, float] = {}

                def progress() -> bool:
                    now = trio.current_time() - killed_at
                    for d in devs:
                        if d.device_id not in moved and d.link.releaser == addr_b:
                            moved[d.device_id] = now
                        if (
                            d.device_id not in reoffered
                            and len(d.commands) > offered_on_a[d.device_id]
                        ):
                            reoffered[d.device_id] = d.commands[-1][1] - killed_at
                    return len(moved) == len(devs) and len(reoffered) == len(devs)

                await wait_until(progress, args.deadline, step=0.02)
                await wait_until(
                    lambda: snapshot(url)["leases"].get(addr_b) == len(devs) + started_on_b,
                    30,
                    step=1.0,
                )
                after = snapshot(url)
                nursery.cancel_scope.cancel()
        finally:
            for proc in (a, b):
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
    same = {k: before[k] == after[k] for k in ("pushes", "push_targets", "devices")}
    same["reports"] = set(before["reports"]) <= set(after["reports"])
    return {
        "devices": args.devices,
        "on_a_killed": len(devs),
        "started_on_b": started_on_b,
        "spread_s": args.spread,
        "connect_all_s": round(connect_s, 2),
        "push_id": push.push_id,
        "moved_to_b": len(moved),
        "reconnect_s": quantiles(list(moved.values())),
        "push_reoffered_by_b": len(reoffered),
        "reoffer_s": quantiles(list(reoffered.values())),
        "leases_before": before["leases"],
        "leases_after": after["leases"],
        "no_lease_after": after["no_lease"][:10],
        "rows_kept": same,
        "rows": {k: len(after[k]) for k in ("pushes", "push_targets", "reports", "devices")},
    }


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    sys.path.insert(0, str(HERE.parent / "tests" / "support"))
    from fp_pg import TEST_SETTINGS, fresh_database, running_cluster

    with running_cluster(TEST_SETTINGS) as cluster, fresh_database(cluster) as fresh:
        yield fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--spread", type=float, default=5.0, help="reconnect_spread (s)")
    parser.add_argument("--deadline", type=float, default=120.0, help="give up after (s)")
    parser.add_argument("--database", help="postgresql:// URL (default: a throwaway cluster)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--logs", default=None, help="keep the releaser logs here (default: the run's temp dir)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not one "failed over" line per device
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.time()
    with database(args.database) as url:
        result = trio.run(measure, args, url)
    result["wall_s"] = round(time.time() - started, 1)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
