#!/usr/bin/env python3
"""Soak: 1,000 devices on one releaser, churning, with a push every 30 s (issue 6).

Run by hand, not by CI; bounded by ``--duration`` (default 600 s) plus a
two-minute hard stop. The releaser is its own process (``fleetpush server``);
this process simulates the devices at the protocol level (as ``fleetpush
bench`` does): each one authenticates with its own key, answers
``__force_update__``, checks for updates on every (re)connect, downloads the
offered release chunk by chunk, verifies the signed manifest, every chunk and
every file, and reports ``update_progress`` ``committed``. Devices disconnect
and reconnect at random (sessions of 5-40 s, 0.5-5 s away) until the last
minute, when churn stops and the fleet must converge.

Reported (JSON on stdout, one summary line on stderr):

- the releaser's RSS once all devices are connected, after the first push,
  after the second (steady state: every device has churned and installed
  twice) and at the end; growth is end vs steady state;
- events lost: ``committed`` reports the devices sent that the releaser
  neither stored in its history (read from its database at the end) nor
  relayed to the watching operator; the live relay's own drops for a slow
  watcher (announced by ``dropped`` events, by design) are reported apart;
- devices ending on the last pushed version (must be all).

Example (the run recorded in specs/THREATS.md)::

    nohup nice -n 10 /work/venv/bin/python scripts/soak.py --devices 1000 \\
        --duration 600 > /tmp/soak.json 2> /tmp/soak.log &
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    FleetpushError,
    RequestReceived,
    TrustRoot,
    verify_manifest,
)
from fleetpush.protocol.keys import private_key_from_seed, public_bytes
from fleetpush.protocol.messages import (
    Ack,
    CheckUpdate,
    CheckUpdateResult,
    GetChunks,
    GetManifest,
    Hello,
    UpdateProgress,
)
from fleetpush.server import publish_release
from fleetpush.server.db import db_path
from packaging.version import Version

from fleetpush.net.dial import dial
from fleetpush.net.peer import Peer
from fleetpush.operator import connect as operator_connect

APP = "soak"
RELEASE_KEY = private_key_from_seed(b"\x51" * 32)
OPERATOR_KEY = private_key_from_seed(b"\x52" * 32)
TRUST = TrustRoot.from_public_keys([public_bytes(RELEASE_KEY)])
log = logging.getLogger("soak")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_release(root: Path, version: str, size: int) -> Path:
    src = root / f"src-{version}"
    src.mkdir(parents=True)
    seed = hashlib.sha256(version.encode()).digest()
    data = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32))
    (src / "app.bin").write_bytes(data)
    (src / "version.txt").write_text(version + "\n")
    return src


def stored_committed(data_dir: Path) -> set[tuple[str, str]]:
    """(device, version) of every ``committed`` progress event in the releaser's history."""
    conn = sqlite3.connect(f"file:{db_path(data_dir)}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT device_id, data FROM events WHERE kind = 'progress'")
        out = set()
        for device_id, data in rows:
            d = json.loads(data)
            if d.get("state") == "committed":
                out.add((device_id, d.get("version")))
        return out
    finally:
        conn.close()


class Device:
    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.id = f"soak-{index:04d}"
        self.key = private_key_from_seed(hashlib.sha256(self.id.encode()).digest())
        self.installed = "1.0.0"
        self.target: str | None = None
        self.connected = False
        self.sessions = 0
        self.committed_sent: set[str] = set()
        self.errors = 0

    def hello(self) -> Hello:
        return Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=self.id,
            public_key=public_bytes(self.key),
            app=APP,
            version=self.installed,
            channel="stable",
        )

    async def on_request(self, peer: Peer, ev: RequestReceived) -> None:
        if ev.method in ("__force_update__", "__apply_update__"):
            self.want(ev.params.version)
            await peer.respond(ev.id, Ack(accepted=True))
        else:
            await peer.respond_error(ev.id, -32601, ev.method)

    def want(self, version: str | None) -> None:
        if version is None or Version(version) <= Version(self.installed):
            return
        if self.target is None or Version(version) > Version(self.target):
            self.target = version
        self.fleet.wake(self)

    async def run(self) -> None:
        rng = random.Random(self.id)
        while not self.fleet.stopping.is_set():
            hold = rng.uniform(5, 40) if self.fleet.churn else None
            try:
                await self.session(hold)
            except (
                FleetpushError,
                OSError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                ExceptionGroup,  # the same, from inside open_peer's nursery (never Cancelled)
            ):
                self.errors += 1
            self.connected = False
            if self.fleet.stopping.is_set():
                return
            await trio.sleep(rng.uniform(0.5, 5) if self.fleet.churn else 0.5)

    async def session(self, hold: float | None) -> None:
        # One slot covers connect and handshake: the releaser's handshake deadline
        # starts at accept, so a device must not queue between the two.
        limit = self.fleet.connect_limit
        await limit.acquire_on_behalf_of(self)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                limit.release_on_behalf_of(self)

        try:
            async with dial(
                ("127.0.0.1", self.fleet.port),
                self.key,
                self.hello(),
                timeout=30,
                on_request=self.on_request,
                name=self.id,
            ) as link:
                release()
                await self.connected_session(link.peer, hold)
        finally:
            release()

    async def connected_session(self, peer: Peer, hold: float | None) -> None:
        self.connected = True
        self.sessions += 1
        with trio.move_on_after(hold if hold is not None else float("inf")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.updater, peer)
                await peer.wait_closed()
                nursery.cancel_scope.cancel()
        # hold expired: leave with a bye, as a device going offline would
        with trio.move_on_after(2):
            await peer.close(1000, "soak churn")

    async def updater(self, peer: Peer) -> None:
        result: CheckUpdateResult = await peer.request(
            "check_update", CheckUpdate(app=APP, version=self.installed), timeout=60
        )
        if result.available:
            self.want(result.version)
        while True:
            while self.target is None or Version(self.target) <= Version(self.installed):
                await self.fleet.wait_wake(self)
            version = self.target
            async with self.fleet.download_limit:
                await self.install(peer, version)

    async def install(self, peer: Peer, version: str) -> None:
        res = await peer.request("get_manifest", GetManifest(app=APP, version=version), timeout=60)
        verified = verify_manifest(
            TRUST, res.manifest, app=APP, high_water=0, now=time.time(), installed_version=None
        )
        m = verified.manifest
        wanted = [(i, c) for i, f in enumerate(m.files) for c in range(len(f.chunks))]
        hashers = [hashlib.sha256() for _ in m.files]
        chunks, done = await peer.request_chunks(
            GetChunks(app=APP, version=version, chunks=wanted), buffer=len(wanted)
        )
        async for chunk in chunks:
            data = bytes(chunk.payload)
            if hashlib.sha256(data).digest() != m.files[chunk.file].chunks[chunk.chunk]:
                raise FleetpushError(f"{self.id}: bad chunk {chunk.file}/{chunk.chunk}")
            hashers[chunk.file].update(data)
        await done()
        for h, f in zip(hashers, m.files, strict=True):
            if h.digest() != f.digest:
                raise FleetpushError(f"{self.id}: bad file {f.path}")
        progress = UpdateProgress(state="committed", app=APP, version=version)
        await peer.notify("update_progress", progress)
        self.committed_sent.add(version)
        self.installed = version
        self.fleet.installs += 1


class Fleet:
    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.devices = [Device(self, i) for i in range(count)]
        self.stopping = trio.Event()
        self.churn = True
        self.connect_limit = trio.CapacityLimiter(64)
        self.download_limit = trio.CapacityLimiter(200)
        self.installs = 0
        self._events: dict[str, trio.Event] = {}

    def wake(self, device: Device) -> None:
        ev = self._events.pop(device.id, None)
        if ev is not None:
            ev.set()

    async def wait_wake(self, device: Device) -> None:
        ev = self._events.setdefault(device.id, trio.Event())
        await ev.wait()

    @property
    def connected(self) -> int:
        return sum(d.connected for d in self.devices)


async def watch(port: int, seen: dict[str, set[str]], seqs: list[int], ready: trio.Event) -> None:
    async with operator_connect(("127.0.0.1", port), OPERATOR_KEY, name="soak-watch") as op:
        ready.set()
        async for event in op.watch():
            seqs.append(event.seq)
            if event.kind == "progress" and event.data.get("state") == "committed":
                seen.setdefault(event.device_id or "", set()).add(event.data["version"])
            elif event.kind == "dropped":
                seqs.append(-int(event.data.get("count", 1)))


async def soak(
    args: argparse.Namespace, work: Path, proc: subprocess.Popen[str], port: int
) -> dict[str, Any]:
    fleet = Fleet(port, args.devices)
    seen: dict[str, set[str]] = {}
    seqs: list[int] = []
    rss: list[tuple[float, int]] = []
    report: dict[str, Any] = {"devices": args.devices, "duration": args.duration}
    started = time.monotonic()
    pushed: list[str] = []

    async def sampler() -> None:
        while True:
            rss.append((time.monotonic() - started, rss_kib(proc.pid)))
            await trio.sleep(5)

    async def push(op: Any, version: str) -> None:
        src = make_release(work, version, args.release_kib * 1024)
        await trio.to_thread.run_sync(
            lambda: publish_release(
                work / "data", src, app=APP, version=version, signing_keys=[RELEASE_KEY],
                chunk_size=16 * 1024,
            )
        )  # fmt: skip
        await op.set_release_status(APP, version, "pre-released")
        await op.set_release_status(APP, version, "approved")
        await op.push(app=APP, version=version, mode="force", all=True)
        pushed.append(version)
        log.info(
            "pushed %s at %.0fs: %d connected", version, time.monotonic() - started, fleet.connected
        )

    with trio.fail_after(args.duration + 120):
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(watch, port, seen, seqs, ready)
            await ready.wait()
            nursery.start_soon(sampler)
            for d in fleet.devices:
                nursery.start_soon(d.run)
            with trio.fail_after(180):
                while fleet.connected < args.devices:
                    await trio.sleep(1)
                    errors = sum(d.errors for d in fleet.devices)
                    log.info("connecting: %d connected, %d errors", fleet.connected, errors)
            report["all_connected_after_s"] = time.monotonic() - started
            report["rss_kib_all_connected"] = rss_kib(proc.pid)
            churn_end = started + args.duration - args.settle
            async with operator_connect(("127.0.0.1", port), OPERATOR_KEY, name="soak-ops") as op:
                n = 1
                while time.monotonic() + args.push_every < churn_end:
                    await push(op, f"1.0.{n}")
                    await trio.sleep(args.push_every / 2)
                    if n == 1:
                        report["rss_kib_first_push"] = rss_kib(proc.pid)
                    elif n == 2:
                        # Steady state: every device has churned and installed twice.
                        report["rss_kib_warm"] = rss_kib(proc.pid)
                    await trio.sleep(args.push_every / 2)
                    n += 1
                await trio.sleep_until(trio.current_time() + max(0.0, churn_end - time.monotonic()))
                fleet.churn = False  # sessions in progress end on their own; no new ones churn
                await push(op, f"1.0.{n}")
            final = pushed[-1]
            deadline = started + args.duration
            while time.monotonic() < deadline:
                if all(d.installed == final for d in fleet.devices):
                    break
                await trio.sleep(1)
            report["converged_after_s"] = time.monotonic() - started
            await trio.sleep(3)  # the last committed events reach the watcher
            report["rss_kib_end"] = rss_kib(proc.pid)
            fleet.stopping.set()
            nursery.cancel_scope.cancel()

    final = pushed[-1]
    sent = {(d.id, v) for d in fleet.devices for v in d.committed_sent}
    got = {(dev, v) for dev, versions in seen.items() for v in versions}
    stored = await trio.to_thread.run_sync(stored_committed, work / "data")
    positive = sorted(s for s in seqs if s >= 0)
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(positive) if b > a + 1)
    report.update(
        pushes=len(pushed),
        final_version=final,
        devices_on_final=sum(d.installed == final for d in fleet.devices),
        installs=fleet.installs,
        sessions=sum(d.sessions for d in fleet.devices),
        session_errors=sum(d.errors for d in fleet.devices),
        committed_sent=len(sent),
        committed_stored=len(sent & stored),
        committed_seen_live=len(sent & got),
        # Lost: a committed report the releaser neither stored nor relayed.
        events_lost=len(sent - stored - got),
        events_not_stored=len(sent - stored),
        event_seq_gaps=gaps,
        events_dropped=-sum(s for s in seqs if s < 0),
        rss_growth=report["rss_kib_end"] / report["rss_kib_warm"] - 1,
        rss_samples=rss[:: max(1, len(rss) // 40)],
        elapsed_s=time.monotonic() - started,
    )
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds, churn included")
    ap.add_argument("--push-every", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=60.0, help="last seconds without churn")
    ap.add_argument("--release-kib", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        make_release(work, "1.0.0", args.release_kib * 1024)
        publish_release(
            work / "data", work / "src-1.0.0", app=APP, version="1.0.0", signing_keys=[RELEASE_KEY]
        )
        # Keep every event of the run in the history, so none is pruned before it is counted.
        config = work / "server.toml"
        config.write_text(f'data_dir = "{work / "data"}"\nhistory_limit = 10000000\n')
        server_log = open(work / "server.log", "w")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(
            [
                sys.executable, "-P", "-m", "fleetpush.cli.main", "server",
                "--config", str(config), "--listen", "127.0.0.1:0",
                "--operator-key", public_bytes(OPERATOR_KEY).hex(),
                "--max-connections", str(args.devices + 100),
                # every simulated device dials from 127.0.0.1 (see bench/harness.py)
                "--max-handshaking", str(args.devices + 100),
                "--max-handshaking-per-source", str(args.devices + 100),
                "--insecure",  # the soak's devices speak plain TCP
            ],
            stdout=subprocess.PIPE, stderr=server_log, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            port = int(line.rsplit(":", 1)[1])
            report = trio.run(soak, args, work, proc, port)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log.close()
    print(json.dumps(report, indent=2))
    ok = report["events_lost"] == 0 and report["devices_on_final"] == args.devices
    print(
        f"devices {args.devices}, pushes {report['pushes']}, on {report['final_version']}: "
        f"{report['devices_on_final']}; events lost {report['events_lost']} "
        f"(committed reports {report['committed_sent']}, stored {report['committed_stored']}, "
        f"relayed live {report['committed_seen_live']}; live relay dropped "
        f"{report['events_dropped']} for the slow watcher); server RSS "
        f"{report['rss_kib_warm'] / 1024:.1f} -> {report['rss_kib_end'] / 1024:.1f} MiB "
        f"({report['rss_growth']:+.1%})",
        file=sys.stderr,
    )
    return 0 if ok and report["rss_growth"] <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
