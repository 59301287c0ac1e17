"""The fan-out bench's peer-delivery mode (``fleetpush bench --p2p``, issue 18).

Run inside the fan-out bench worker (bench/fleet.py, command ``download_p2p``),
with that worker's connected devices. Every device also serves peers
(client/p2p_serve.py on 127.0.0.1, port 0) once it has the release, and
fetches as an agent with ``p2p = true`` does: ``get_peers`` to the real
releaser (which is the tracker and signs the peer token with its timestamp
key), the peer pre-pass (client/p2p_fetch.py), then the ordinary download
(client/download.py) for whatever the peers did not deliver, and finally
``update_progress staged``, which makes it a holder the tracker hands out.

The devices go in doubling waves (1, 2, 4, ... devices at once), as a phased
deployment does: a wave's devices find the holders of the waves before it.
All devices connect from 127.0.0.1 and report the same LAN, so every holder
is "near" (§7.11). Each round uses its own release version, so no device
holds it before the round starts.

On loopback p2p cannot beat the releaser on bandwidth: the devices' serving,
hashing and writing share the machine's cores with the releaser, and the
waves serialize. What it shows is the releaser's egress, which falls from
``devices x size`` to about one ``size``, and what that costs in time here.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetpush.client.download import download
from fleetpush.client.layout import StateLayout
from fleetpush.client.p2p_fetch import FetchContext, all_chunks, fetch_from_peers
from fleetpush.client.p2p_serve import Held, ServeContext, serve_peers
from fleetpush.net.peer import Peer
from fleetpush.protocol import TrustRoot, verify_manifest
from fleetpush.protocol.messages import Empty, GetManifest, GetManifestResult, UpdateProgress
from fleetpush.protocol.p2p import GetPeers, PeerList, ReportPeer

#: the LAN every bench device reports (``get_peers.subnet``)
SUBNET = "bench-lan"


@attrs.define
class P2PDevice:
    """One connected bench device, with its key and what it serves."""

    index: int
    peer: Peer
    key: Ed25519PrivateKey
    serving: ServeContext
    port: int = 0
    held: Held | None = None


def waves(n: int) -> list[int]:
    """Doubling wave sizes covering ``n`` devices: 1, 2, 4, ... (the last one what is left)."""
    out: list[int] = []
    size = 1
    while sum(out) < n:
        out.append(min(size, n - sum(out)))
        size *= 2
    return out


async def start_serving(
    nursery: trio.Nursery,
    devices: list[tuple[int, Peer, Ed25519PrivateKey]],
    timestamp_key_hex: str,
) -> list[P2PDevice]:
    """A peer listener per device on 127.0.0.1 (port 0), trusting the releaser's
    timestamp key for peer tokens; they serve whatever each device holds."""
    trust = TrustRoot.from_public_keys([bytes.fromhex(timestamp_key_hex)])
    out: list[P2PDevice] = []
    for index, peer, key in devices:
        dev = P2PDevice(
            index=index,
            peer=peer,
            key=key,
            serving=ServeContext(
                device_id=peer.name, trust=lambda: trust, holdings=_no_holdings, now=time.time
            ),
        )
        dev.serving.holdings = _holdings_of(dev)
        dev.port = await nursery.start(serve_peers, dev.serving, "127.0.0.1", 0)
        out.append(dev)
    return out


def _no_holdings(app: str, version: str) -> Held | None:
    return None


def _holdings_of(dev: P2PDevice) -> Any:
    def holdings(app: str, version: str) -> Held | None:
        held = dev.held
        if held is not None and (held.manifest.app, held.manifest.version) == (app, version):
            return held
        return None

    return holdings


async def download_p2p(
    devices: list[P2PDevice],
    *,
    app: str,
    version: str,
    trust: TrustRoot,
    workdir: Path,
    window: int,
) -> dict[str, Any]:
    """Every device gets ``version`` (peers first), wave by wave; the figures.

    Returns ``{"elapsed", "bytes", "devices", "from_peers", "from_releaser",
    "reported"}``; the staged files are removed at the end. Raises what
    ``download`` raises if a device cannot get the release from the releaser.
    """
    from_peers = from_releaser = 0
    reported: list[str] = []

    async def one(dev: P2PDevice) -> None:
        nonlocal from_peers, from_releaser
        got: GetManifestResult = await dev.peer.request(
            "get_manifest", GetManifest(app=app, version=version), timeout=120.0
        )
        verified = verify_manifest(
            trust, got.manifest, app=app, high_water=0, now=time.time(), installed_version=None
        )
        m = verified.manifest
        state = workdir / f"p{dev.index:04d}"
        layout = StateLayout.of(state / "state")
        (state / "app").mkdir(parents=True, exist_ok=True)
        answer: PeerList = await dev.peer.request(
            "get_peers",
            GetPeers(app=app, version=version, subnet=SUBNET, host="127.0.0.1", port=dev.port),
            timeout=30.0,
        )
        if answer.peers and answer.token is not None:

            async def report(peer_id: str, reason: str) -> None:
                reported.append(peer_id)
                params = ReportPeer(app=app, version=version, peer_id=peer_id, reason=reason)
                await dev.peer.request("report_peer", params, timeout=30.0)

            ctx = FetchContext(device_id=dev.peer.name, key=dev.key, report=report)
            wanted: dict[Hashable, int] = dict(all_chunks(m))
            res = await fetch_from_peers(
                ctx,
                answer.peers,
                token=answer.token,
                manifest=m,
                files_dir=layout.staged_files(version),
                missing=wanted,
            )
            from_peers += res.bytes_from_peers
        done = await download(
            dev.peer,
            got.manifest,
            m,
            layout,
            state / "app",
            window=window,
            io_threads=1,
            request_timeout=300.0,
        )
        from_releaser += done.bytes_fetched
        dev.held = Held(got.manifest, m, layout.staged_files(version))
        # Staged: the registry now says this device holds the release (§7.11);
        # the ping's answer says the releaser has handled the notification.
        staged = UpdateProgress(state="staged", app=app, version=version)
        await dev.peer.notify("update_progress", staged)
        await dev.peer.request("ping", Empty(), timeout=30.0)

    start = time.perf_counter()
    try:
        offset = 0
        for size in waves(len(devices)):
            async with trio.open_nursery() as nursery:
                for dev in devices[offset : offset + size]:
                    nursery.start_soon(one, dev)
            offset += size
        elapsed = time.perf_counter() - start
    finally:
        for dev in devices:
            dev.held = None

        def remove() -> None:
            for d in devices:
                shutil.rmtree(workdir / f"p{d.index:04d}", ignore_errors=True)

        await trio.to_thread.run_sync(remove)
    return {
        "elapsed": elapsed,
        "bytes": from_peers + from_releaser,
        "devices": len(devices),
        "from_peers": from_peers,
        "from_releaser": from_releaser,
        "reported": reported,
    }


__all__ = ["P2PDevice", "download_p2p", "start_serving", "waves"]
