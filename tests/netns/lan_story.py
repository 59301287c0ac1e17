"""The one-LAN story of tests/netns/test_p2p_lan.py and scripts/p2p_lan.py (issue 18).

Moved out of lan.py (which builds the LAN and its fleet) to keep that module
under the size guideline; the story is unchanged: ``liar`` and ``mute`` get
the release first, then every honest device in doubling phases.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lan import APP, VERSION, Fleet, Lan


def run(
    work: Path, devices: int, size: int, chunk: int = 1 << 20, timeout: float = 600
) -> dict[str, Any]:
    """The whole story in ``work``; returns its figures (and leaves the trees for checks)."""
    with Lan() as net:
        fleet = Fleet(net, work, devices, size, chunk)
        fleet.setup()
        fleet.wait_connected(120)
        hostile = ["liar", "mute"]
        first = fleet.cli(
            "deploy", "create", APP, VERSION, *(a for n in hostile for a in ("--device", n))
        )
        fleet.wait_installed(hostile, timeout)
        fleet.manifest_bytes = fleet.installed_manifest_bytes("liar")
        before = fleet.chunk_bytes_served()
        wire_before = net.bridge_tx_bytes()
        fleet.corrupt_liar()
        fleet.silence_mute()
        honest = fleet.names[2:]
        phases, n = [], 1
        while n < len(honest):
            phases.append(str(n))
            n = 2 * n + 1
        phases.append("100%")
        started = time.monotonic()
        second = fleet.cli(
            "deploy", "create", APP, VERSION, "--phases", ",".join(phases),
            *(a for n in honest for a in ("--device", n)),
        )  # fmt: skip
        fleet.wait_installed(honest, timeout)
        elapsed = time.monotonic() - started
        egress = fleet.chunk_bytes_served() - before
        wire = net.bridge_tx_bytes() - wire_before
        metrics = fleet.metrics() or {}
        events = fleet.cli("events", "--type", "bad_peer", "--limit", "1000")
        deliveries = fleet.cli("events", "--type", "p2p_delivery", "--limit", "10000")
        shown = fleet.cli("deploy", "show", second["deployment_id"])
        devices_view = fleet.cli("devices")
        shown_text = fleet.cli_text("deploy", "show", second["deployment_id"])
        from_peers = sum(
            int(e["data"]["from_peers"]) for e in deliveries if e["device_id"] in honest
        )
        from_releaser = sum(
            int(e["data"]["from_releaser"]) for e in deliveries if e["device_id"] in honest
        )
        liar_status = fleet.p2p_status("liar")
        costs = sorted(fleet.agent_cost(n) for n in honest)
        rss = sorted(c[0] for c in costs)
        cpu = sorted(c[1] for c in costs)
        result = {
            "devices": devices,
            "honest_devices": len(honest),
            "release_bytes": size,
            "chunk_bytes": chunk,
            "manifest_bytes": fleet.manifest_bytes,
            "phases": phases,
            "hostile_deployment": first["deployment_id"],
            "deployment": second["deployment_id"],
            "releaser_chunk_bytes": egress,
            "egress_ratio": round(egress / size, 3),
            "egress_limit_bytes": int(1.2 * size) + len(honest) * fleet.manifest_bytes,
            "releaser_wire_bytes": wire,
            "device_bytes_from_peers": from_peers,
            "device_bytes_from_releaser": from_releaser,
            "delivered_bytes_metric": {
                k.split('"')[1]: int(v)
                for k, v in metrics.items()
                if k.startswith("fleetpush_delivered_bytes_total{")
            },
            "seconds_to_all_installed": round(elapsed, 1),
            "bad_peer_events": [
                {"device_id": e["device_id"], **{k: e["data"][k] for k in ("reporter", "reason")}}
                for e in events
            ],
            "p2p_bad_rows": fleet.bad_rows(),
            "liar_uploaded": liar_status,
            "mute_links_accepted": fleet.mute_accepts(),
            # Every honest agent's whole life: start, connect, download (peers
            # first), verify, install, serve the devices of later phases.
            "agent_peak_rss_bytes": {"median": rss[len(rss) // 2], "max": rss[-1]},
            "agent_cpu_s": {"median": round(cpu[len(cpu) // 2], 2), "max": round(cpu[-1], 2)},
            "deploy_show": shown,
            "devices_view": devices_view,
            "deploy_show_text": shown_text,
            "installed": sorted(n for n in fleet.names if fleet.installed(n)),
            "src": str(fleet.src),
            "work": str(work),
        }
        return result
