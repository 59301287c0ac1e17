"""A fleet of real device connections in one process, driven by the bench.

Run as ``python -m fleetpush.bench.fleet JOB.json``: it connects ``devices``
device sessions to the releaser (handshake with a device key each, like an
updater), prints one JSON line ``{"ready": n}``, then obeys one command per
stdin line, answering each with one JSON line on stdout:

- ``download APP VERSION``: every device fetches the release's signed
  manifest, verifies it against the trusted release key, and downloads it
  with the updater's own download module (``fleetpush.client.download``:
  windowed ``get_chunks``, each chunk verified against the signed manifest
  before it is written) into its own state directory, all at once. Answers
  ``{"elapsed": s, "bytes": total}``; the staged files are then removed.
- ``arm``: start collecting ``__force_update__`` arrivals; answers
  ``{"armed": true}``. Each arrival is stamped with ``time.monotonic()``
  (CLOCK_MONOTONIC, the same clock in every process) and acknowledged.
- ``collect TIMEOUT``: waits until every device got one (or TIMEOUT) and
  answers ``{"times": [...]}``.
- ``simulate FAIL_PERCENT SECONDS``: from now on each device that receives
  ``__force_update__`` acknowledges it and, SECONDS later, reports an
  update as a device does (``downloading`` naming the push, ``trial``, then
  ``committed``, or ``rolled_back`` with an error naming the version) without
  downloading anything: the rollout bench (bench/rollout.py). FAIL_PERCENT of
  the devices, chosen by a hash of the device id, roll back; 0 makes every
  device commit. Answers ``{"simulating": true}`` and clears the record.
- ``outcomes``: answers ``{"started": n, "outcomes": [[time, device, state],
  ...]}``: how many devices got a command since ``simulate``, and each
  outcome reported with the wall-clock time it was sent.
- ``serve_p2p TIMESTAMP_KEY_HEX``: every device starts serving peers on
  127.0.0.1 (bench/fanout_p2p.py); answers ``{"serving": n}``.
- ``download_p2p APP VERSION``: every device gets the release peers first,
  in doubling waves (bench/fanout_p2p.py); answers as ``download`` does,
  plus ``from_peers`` and ``from_releaser`` bytes.
- ``rss``: answers ``{"rss": peak resident bytes of this process}``.
- ``quit``.

Running the devices in their own process keeps their memory and CPU out of
the releaser's figures and lets the bench report each side's peak RSS.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from fleetpush.client.download import capabilities, download
from fleetpush.client.layout import StateLayout
from fleetpush.net.dial import dial
from fleetpush.net.keys import generate_private_key
from fleetpush.net.peer import Peer
from fleetpush.net.tls import ClientTls
from fleetpush.protocol import (
    PROTOCOL_VERSION,
    RequestReceived,
    TrustRoot,
    verify_manifest,
)
from fleetpush.protocol.keys import public_bytes, public_key_from_hex
from fleetpush.protocol.messages import (
    Ack,
    GetManifest,
    GetManifestResult,
    Hello,
    UpdateCommand,
    UpdateProgress,
)

from ..demo.processes import self_peak_rss

log = logging.getLogger("fleetpush.bench.fleet")
CONNECT_CONCURRENCY = 64


class Fleet:
    def __init__(self, job: dict[str, Any]) -> None:
        self.host: str = job["host"]
        self.port: int = int(job["port"])
        self.count: int = int(job["devices"])
        self.app: str = job["app"]
        self.prefix: str = job["prefix"]
        self.workdir = Path(job["workdir"])
        self.trust = TrustRoot.from_public_keys([public_key_from_hex(job["release_key"])])
        self.window: int = int(job.get("window", 16))
        self.io_threads: int = int(job.get("io_threads", 2))
        #: source address of every link (bench/idle.py: one 127.0.0.x per worker)
        self.local_address: str | None = job.get("local_address")
        #: the releaser's certificate pin; absent: plain TCP (the bench's releaser is --insecure)
        self.tls = ClientTls(pin_sha256=job["tls_pin"]) if job.get("tls_pin") else None
        #: (device index, its connected peer), in the order they connected
        self.peers: list[tuple[int, Peer]] = []
        #: device index -> its key (the peer mode proves it to other devices)
        self.keys: dict[int, Any] = {}
        self.p2p: list[Any] = []
        self.arrivals: list[float] = []
        self.armed = False
        self.all_arrived = trio.Event()
        self.ready = trio.Event()
        #: (fail percent, seconds) of ``simulate``; None: commands are only acknowledged
        self.simulate: tuple[float, float] | None = None
        self.started: set[str] = set()
        self.outcomes: list[tuple[float, str, str]] = []
        self._spawn: trio.Nursery | None = None

    def fails(self, device_id: str) -> bool:
        """Whether this device's simulated update rolls back (stable for the run)."""
        assert self.simulate is not None
        digest = hashlib.sha256(device_id.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 10_000 < self.simulate[0] * 100

    async def simulate_update(self, peer: Peer, cmd: UpdateCommand) -> None:
        """Report one update as a device would, SECONDS after the command."""
        assert self.simulate is not None
        device_id = peer.name
        await trio.sleep(self.simulate[1])
        failing = self.fails(device_id)
        steps = [
            UpdateProgress(
                state="downloading", app=cmd.app, version=cmd.version, push_id=cmd.push_id
            ),
            UpdateProgress(state="trial", app=cmd.app, version=cmd.version),
            UpdateProgress(state="committed", app=cmd.app, version=cmd.version)
            if not failing
            else UpdateProgress(
                state="rolled_back",
                app=cmd.app,
                version="0.0.1",
                error=f"{cmd.version}: the new version exited with code 3 (simulated)",
            ),
        ]
        for p in steps:
            if p.state in ("committed", "rolled_back"):
                self.outcomes.append((time.time(), device_id, p.state))
            await peer.notify("update_progress", p)

    async def on_request(self, peer: Peer, req: RequestReceived) -> None:
        if req.method == "__force_update__" and self.simulate is not None:
            await peer.respond(req.id, Ack(accepted=True))
            if peer.name not in self.started:
                self.started.add(peer.name)
                assert self._spawn is not None
                self._spawn.start_soon(self.simulate_update, peer, req.params)
            return
        if req.method in ("__force_update__", "__apply_update__"):
            if self.armed:
                self.arrivals.append(time.monotonic())
                if len(self.arrivals) >= self.count:
                    self.all_arrived.set()
                # One process stands in for N devices that would each answer
                # on their own CPU: let the other devices' handlers that are
                # ready take their requests before this one writes its ack
                # (the peer writes an ack at once when the connection is idle).
                await trio.lowlevel.checkpoint()
            await peer.respond(req.id, Ack(accepted=True))
        else:
            await peer.respond_error(req.id, -32601, f"{req.method} not served by the bench")

    async def device(self, index: int, limiter: trio.CapacityLimiter) -> None:
        key = generate_private_key()
        device_id = f"{self.prefix}-{index:04d}"
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            role="device",
            peer_id=device_id,
            public_key=public_bytes(key),
            app=self.app,
            version="0.0.1",
            channel="stable",
            capabilities=capabilities(),
        )
        async with AsyncExitStack() as stack:
            # The limiter covers connect and handshake only, not the connected life.
            async with limiter:
                link = await stack.enter_async_context(
                    dial(
                        (self.host, self.port),
                        key,
                        hello,
                        timeout=60.0,
                        tls=self.tls,
                        on_request=self.on_request,
                        name=device_id,
                        local_address=self.local_address,
                    )
                )
            if link.hello.heartbeat > 0:  # adopted as the updater does (client/session.py)
                link.peer.conn.heartbeat = link.hello.heartbeat
            if link.auth.status != "accepted":
                raise SystemExit(f"{device_id}: enrollment {link.auth.status}")
            self.peers.append((index, link.peer))
            self.keys[index] = key
            if len(self.peers) == self.count:
                self.ready.set()
            await link.peer.wait_closed()

    async def download_one(self, index: int, peer: Peer, version: str) -> int:
        result: GetManifestResult = await peer.request(
            "get_manifest", GetManifest(app=self.app, version=version), timeout=120.0
        )
        verified = verify_manifest(
            self.trust,
            result.manifest,
            app=self.app,
            high_water=0,
            now=time.time(),
            installed_version=None,
        )
        state = self.workdir / f"d{index:04d}"
        layout = StateLayout.of(state / "state")
        (state / "app").mkdir(parents=True, exist_ok=True)
        try:
            res = await download(
                peer,
                result.manifest,
                verified.manifest,
                layout,
                state / "app",
                window=self.window,
                io_threads=self.io_threads,
                request_timeout=300.0,
            )
        finally:
            await trio.to_thread.run_sync(shutil.rmtree, state, True)
        return res.bytes_fetched

    async def download_all(self, version: str) -> dict[str, Any]:
        totals: list[int] = []
        start = time.perf_counter()

        async def one(index: int, peer: Peer) -> None:
            totals.append(await self.download_one(index, peer, version))

        async with trio.open_nursery() as nursery:
            for index, peer in self.peers:
                nursery.start_soon(one, index, peer)
        elapsed = time.perf_counter() - start
        return {"elapsed": elapsed, "bytes": sum(totals), "devices": len(totals)}


async def _lines() -> Any:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(job: dict[str, Any]) -> None:
    fleet = Fleet(job)
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    async with trio.open_nursery() as nursery:
        fleet._spawn = nursery
        for i in range(fleet.count):
            nursery.start_soon(fleet.device, i, limiter)
        with trio.fail_after(float(job.get("connect_timeout", 120))):
            await fleet.ready.wait()
        _answer({"ready": len(fleet.peers)})
        async for line in _lines():
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "download":
                _answer(await fleet.download_all(cmd[2]))
            elif cmd[0] == "serve_p2p":
                from .fanout_p2p import start_serving

                devices = [(i, p, fleet.keys[i]) for i, p in fleet.peers]
                fleet.p2p = await start_serving(nursery, devices, cmd[1])
                _answer({"serving": len(fleet.p2p)})
            elif cmd[0] == "download_p2p":
                from .fanout_p2p import download_p2p

                _answer(
                    await download_p2p(
                        fleet.p2p,
                        app=cmd[1],
                        version=cmd[2],
                        trust=fleet.trust,
                        workdir=fleet.workdir,
                        window=fleet.window,
                    )
                )
            elif cmd[0] == "arm":
                # One process stands in for N devices, so its heap holds N
                # connections' long-lived objects; a full collection over them
                # during the push (~100 ms at 1000 devices) would be charged to
                # the releaser's latency although no real device has that heap.
                # Collect now and freeze the survivors until the push is collected.
                gc.collect()
                gc.freeze()
                fleet.arrivals = []
                fleet.all_arrived = trio.Event()
                fleet.armed = True
                _answer({"armed": True})
            elif cmd[0] == "collect":
                with trio.move_on_after(float(cmd[1])):
                    await fleet.all_arrived.wait()
                fleet.armed = False
                gc.unfreeze()
                _answer({"times": fleet.arrivals})
            elif cmd[0] == "simulate":
                fleet.simulate = (float(cmd[1]), float(cmd[2]))
                fleet.started = set()
                fleet.outcomes = []
                _answer({"simulating": True})
            elif cmd[0] == "outcomes":
                _answer(
                    {
                        "started": len(fleet.started),
                        "outcomes": [list(o) for o in fleet.outcomes],
                    }
                )
            elif cmd[0] == "rss":
                _answer({"rss": self_peak_rss()})
            elif cmd[0] == "quit":
                break
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with open(sys.argv[1]) as f:
        job = json.load(f)
    if job.get("lean"):  # bench --idle: a selectors loop, no trio (lean_fleet.py)
        from .lean_fleet import main as lean_main

        lean_main(job)
    else:
        trio.run(main, job)
