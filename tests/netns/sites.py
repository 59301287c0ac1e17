"""Two sites behind NAT, the releaser on a third segment (issue 18, "near" in §7.11).

Topology (root only; built on :class:`lan.Lan`, whose cleanup deletes it all):

* namespace ``hub``: the "internet" segment, a bridge holding the releaser's
  address (``lan.HUB_ADDR``), where ``fleetpush server`` runs;
* per site ``s`` (0 = A, 1 = B) a router namespace ``{tag}-r{s}``: its
  ``wan`` on the hub's bridge at :func:`router_wan`, a bridge of its own for
  the site's LAN (:func:`site_subnet`, the router at ``.1``), IPv4 forwarding
  on, and ``iptables -t nat ... MASQUERADE`` out of ``wan``: the releaser sees
  every device of the site as the router's address, as behind a home or
  plant router;
* each device in its own namespace on its site's bridge, its default route
  via the router. Nothing routes into a site: a peer of site B can never be
  reached from site A (no port forwarding, no hairpin).

Both sites' devices are in the same operator group (``lan``), so the group
does not tell them apart: only "same public address + same reported subnet"
does. Devices are configured as an operator would behind NAT: ``p2p_subnet``
is the site's LAN, ``p2p_listen`` is the wildcard and ``p2p_host`` is left
out (what a device announces must come from the device itself).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from lan import APP, P2P_PORT, PREFIX, VERSION, Fleet, Lan, _ip, unavailable

SITES = "ab"


def nat_unavailable() -> str | None:
    """Why two NAT'd sites cannot be built here, or None if they can."""
    reason = unavailable()
    if reason is None and shutil.which("iptables") is None:
        reason = "iptables is not installed (apt-get install -y iptables)"
    return reason


def router_wan(s: int) -> str:
    """Site ``s``'s router on the internet segment: the address the releaser sees."""
    return f"198.18.250.{1 + s}"


def site_subnet(s: int) -> str:
    return f"10.{1 + s}.0.0/24"


def site_addr(s: int, n: int) -> str:
    """Device ``n`` of site ``s`` (the router is .1)."""
    return f"10.{1 + s}.0.{2 + n}"


def site_of(name: str) -> int:
    return SITES.index(name[0])


def add_router(net: Lan, s: int) -> str:
    """Site ``s``'s router namespace (NAT out of ``wan``); its name."""
    ns = f"{net.tag}-r{s}"
    net.devices.append(ns)  # before it exists: cleanup deletes what was made
    _ip("netns", "add", ns)
    _ip("link", "add", f"w{s}", "netns", net.hub, "type", "veth", "peer", "name", "wan",
        "netns", ns)  # fmt: skip
    _ip("-n", net.hub, "link", "set", f"w{s}", "master", "br0", "up")
    _ip("-n", ns, "addr", "add", f"{router_wan(s)}/{PREFIX}", "dev", "wan")
    _ip("-n", ns, "link", "add", "br0", "type", "bridge")
    _ip("-n", ns, "addr", "add", f"10.{1 + s}.0.1/24", "dev", "br0")
    for link in ("lo", "wan", "br0"):
        _ip("-n", ns, "link", "set", link, "up")
    for argv in (
        ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"],
    ):
        out = net.run(ns, argv, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"router {ns}: {' '.join(argv)}: {out.stderr.strip()}")
    return ns


def add_site_device(net: Lan, i: int, s: int, n: int) -> str:
    """Device ``i`` (device ``n`` of site ``s``) on its site's bridge; its namespace."""
    ns = f"{net.tag}-d{i}"
    router = f"{net.tag}-r{s}"
    net.devices.append(ns)
    _ip("netns", "add", ns)
    _ip("link", "add", f"l{i}", "netns", router, "type", "veth", "peer", "name", "eth0",
        "netns", ns)  # fmt: skip
    _ip("-n", router, "link", "set", f"l{i}", "master", "br0", "up")
    _ip("-n", ns, "addr", "add", f"{site_addr(s, n)}/24", "dev", "eth0")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", ns, "route", "add", "default", "via", f"10.{1 + s}.0.1")
    return ns


class SiteFleet(Fleet):
    """``per_site`` devices in each of sites A and B (``a1``, ``a2``, ..., ``b1``, ...)."""

    def __init__(self, net: Lan, work: Path, per_site: int, size: int, chunk: int) -> None:
        names = [f"{site}{n}" for site in SITES for n in range(1, per_site + 1)]
        settings: dict[str, dict[str, object]] = {
            name: {
                "p2p_listen": f"0.0.0.0:{P2P_PORT}",
                "p2p_host": None,
                "p2p_subnet": site_subnet(site_of(name)),
            }
            for name in names
        }
        super().__init__(net, work, len(names), size, chunk, names=names, settings=settings)
        self.routers: dict[int, str] = {}

    def place(self, i: int, name: str) -> tuple[str, str]:
        s = site_of(name)
        if s not in self.routers:
            self.routers[s] = add_router(self.lan, s)
        n = int(name[1:]) - 1
        return add_site_device(self.lan, i, s, n), site_addr(s, n)

    def handed(self, name: str) -> list[tuple[str, str]]:
        """(peer, host) the tracker handed ``name`` (its agent's "p2p: peers for" lines)."""
        log = (self.logs / f"{name}.log").read_text(errors="replace")
        out = []
        for line in re.findall(r"p2p: peers for \S+: (.*)", log):
            for item in line.split(", "):
                peer, _, where = item.partition("@")
                out.append((peer, where.rpartition(":")[0]))
        return out

    def tracker_rows(self) -> dict[str, dict[str, Any]]:
        """p2p_peers as the releaser stored them: where it sees each device, what it reported."""
        db = sqlite3.connect(f"file:{self.data / 'fleetpush.db'}?mode=ro", uri=True, timeout=10)
        try:
            rows = db.execute("SELECT device_id, public_addr, subnet, host, port FROM p2p_peers")
            return {
                r[0]: {"public_addr": r[1], "subnet": r[2], "host": r[3], "port": r[4]}
                for r in rows
            }
        finally:
            db.close()


def run_two_sites(
    work: Path, per_site: int, size: int, chunk: int = 1 << 20, timeout: float = 600
) -> dict[str, Any]:
    """Deploy the release to both sites, doubling waves from one seed per site. Its figures."""
    with Lan() as net:
        fleet = SiteFleet(net, work, per_site, size, chunk)
        fleet.setup()
        fleet.wait_connected(120)
        # Waves over both sites at once, doubling per site (1, 2, 4, ...): the
        # rollout order inside one phased deployment is a hash, which could
        # start a site with several devices and no holder.
        seeds = [f"{site}1" for site in SITES]
        waves: list[list[str]] = []
        n, size_ = 1, 1
        while n <= per_site:
            upto = min(per_site, n + size_ - 1)
            waves.append([f"{site}{k}" for site in SITES for k in range(n, upto + 1)])
            n, size_ = upto + 1, 2 * size_
        before = fleet.chunk_bytes_served()
        started = time.monotonic()
        seeded = started
        for wave in waves:
            second = fleet.cli(
                "deploy", "create", APP, VERSION, *(a for d in wave for a in ("--device", d))
            )
            fleet.wait_installed(wave, timeout)
            if wave[0] == seeds[0]:
                seeded = time.monotonic()
        done = time.monotonic()
        egress = fleet.chunk_bytes_served() - before
        manifest = fleet.installed_manifest_bytes(seeds[0])
        deliveries = fleet.cli("events", "--type", "p2p_delivery", "--limit", "10000")
        return {
            "sites": len(SITES),
            "devices_per_site": per_site,
            "release_bytes": size,
            "chunk_bytes": chunk,
            "manifest_bytes": manifest,
            "waves_per_site": [len(w) // len(SITES) for w in waves],
            "last_deployment": second["deployment_id"],
            "releaser_chunk_bytes": egress,
            "egress_copies": round(egress / size, 3),
            "egress_limit_bytes": int(1.2 * size * len(SITES)) + len(fleet.names) * manifest,
            "device_bytes_from_peers": sum(int(e["data"]["from_peers"]) for e in deliveries),
            "device_bytes_from_releaser": sum(int(e["data"]["from_releaser"]) for e in deliveries),
            "seconds_seeds_installed": round(seeded - started, 1),
            "seconds_to_all_installed": round(done - started, 1),
            "handed": {n: fleet.handed(n) for n in fleet.names},
            "tracker": fleet.tracker_rows(),
            "routers": {SITES[s]: router_wan(s) for s in range(len(SITES))},
            "installed": sorted(n for n in fleet.names if fleet.installed(n)),
            "src": str(fleet.src),
            "work": str(work),
        }
