"""Measure device failover (issue 15, §2): kill -9 one of two releasers, watch the herd.

Starts two real ``fleetpush server --insecure`` processes on 127.0.0.1 (port 0,
each its own data dir, auto-enrolment), runs ``--devices`` device links
(:class:`fleetpush.client.session.ReleaserLink`, the device's own link code) in
this process with both addresses, waits until all are connected, then kills
(SIGKILL) the releaser holding the most devices and reports how long its
devices took to be connected to the survivor, and how their reconnects spread
over time (the thundering herd the jittered spread is there to avoid).

    python scripts/failover_herd.py --devices 300 --spread 5

A measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import trio
from fleetpush.client.config import UpdaterConfig
from fleetpush.client.session import ReleaserLink
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello

from fleetpush.net.keys import generate_private_key


def start_releaser(data_dir: Path, devices: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "fleetpush.cli.main", "server",
         "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--insecure",
         "--max-handshaking-per-source", str(devices + 16)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc, f"127.0.0.1:{line.rsplit(':', 1)[1].strip()}"
    raise SystemExit("fleetpush: failover_herd: a releaser did not start")


def make_link(i: int, servers: list[str], base: Path, spread: float) -> ReleaserLink:
    device_id = f"herd-{i:05d}"
    cfg = UpdaterConfig(
        app="demo",
        device_id=device_id,
        state_dir=base / device_id / "state",
        app_root=base / device_id / "app",
        server=tuple(servers),
        trusted_keys=(),
        insecure=True,
        backoff_initial=1.0,
        backoff_max=30.0,
        reconnect_spread=spread,
    )
    key = generate_private_key()
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        role="device",
        peer_id=device_id,
        public_key=public_bytes(key),
        app="demo",
        version="1.0.0",
        channel="stable",
    )
    return ReleaserLink(cfg, key, hello=lambda: hello, rng=random.Random(i))


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fp-herd-") as tmp:
        base = Path(tmp)
        procs = dict(start_releaser(base / n, args.devices)[::-1] for n in ("ra", "rb"))
        try:
            servers = list(procs)
            links = [make_link(i, servers, base, args.spread) for i in range(args.devices)]
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(link.run)
                with trio.fail_after(120):
                    while not all(link.releaser for link in links):
                        await trio.sleep(0.1)
                held = Counter(link.releaser for link in links)
                victim = held.most_common(1)[0][0]
                assert victim is not None
                moved = [link for link in links if link.releaser == victim]
                print(f"devices per releaser before: {dict(held)}; killing {victim}")
                killed_at = trio.current_time()
                procs[victim].kill()
                back: dict[int, float] = {}
                with trio.move_on_after(args.deadline):
                    while len(back) < len(moved):
                        now = trio.current_time() - killed_at
                        for n, link in enumerate(moved):
                            if n not in back and link.releaser not in (None, victim):
                                back[n] = now
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            times = sorted(back.values())
            print(f"reconnected to the survivor: {len(times)}/{len(moved)}")
            if times:
                q = statistics.quantiles(times, n=20) if len(times) > 1 else [times[0]] * 19
                print(
                    f"seconds after kill -9: min {times[0]:.2f}"
                    f" median {statistics.median(times):.2f}"
                    f" p95 {q[18]:.2f} max {times[-1]:.2f}"
                )
                per_second = Counter(int(t) for t in times)
                print(
                    "arrivals per second:",
                    [per_second.get(s, 0) for s in range(int(times[-1]) + 1)],
                )
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--spread", type=float, default=5.0, help="reconnect_spread (s)")
    parser.add_argument("--deadline", type=float, default=60.0, help="give up after (s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not one "failed over" line per device
    trio.run(measure, args)


if __name__ == "__main__":
    main()
