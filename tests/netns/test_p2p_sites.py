"""Peer delivery across two sites behind NAT (issue 18; root, ip netns, iptables).

A real ``fleetpush server`` on an "internet" segment and 3 real
``fleetpush agent`` processes (``p2p = true``) in each of two sites, each
site behind its own NAT router (tests/netns/sites.py). All six devices are
in one operator group, so only "same public address + same reported subnet"
(§7.11) tells the sites apart. ``a1`` and ``b1`` get the release first, then
the other four (one wave). The measured run (two sites of 10 devices) is
``scripts/p2p_lan.py --sites 2 --devices 20 --size 64MiB --json``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sites

pytestmark = pytest.mark.netns

SIZE = 4 << 20
CHUNK = 512 << 10
PER_SITE = 3


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    reason = sites.nat_unavailable()
    if reason is not None:
        pytest.skip(f"NAT'd sites unavailable: {reason}")
    work = tmp_path_factory.mktemp("sites")
    # Every wait inside is bounded (agents connecting, each deployment).
    return sites.run_two_sites(work, PER_SITE, SIZE, CHUNK, timeout=180)


def test_every_device_of_both_sites_installs_byte_for_byte(two_sites: dict) -> None:
    names = [f"{s}{n}" for s in "ab" for n in range(1, PER_SITE + 1)]
    assert two_sites["installed"] == sorted(names)
    src = Path(two_sites["src"])
    for name in names:
        app = Path(two_sites["work"]) / "devices" / name / "app"
        for f in ("a.bin", "b.bin"):
            assert (app / f).read_bytes() == (src / f).read_bytes(), (name, f)


def test_the_releaser_sees_each_site_as_its_router_and_peers_at_their_lan_address(
    two_sites: dict,
) -> None:
    # What "near" is computed from: the public address is the router's (NAT),
    # the host a peer is dialled at is its own LAN address, not the router's.
    for name, row in two_sites["tracker"].items():
        s = sites.site_of(name)
        assert row["public_addr"] == sites.router_wan(s), name
        assert row["subnet"] == sites.site_subnet(s), name
        assert row["host"] == sites.site_addr(s, int(name[1:]) - 1), name


def test_a_device_is_handed_only_peers_of_its_own_site(two_sites: dict) -> None:
    handed = two_sites["handed"]
    for name in [f"{s}{n}" for s in "ab" for n in range(2, PER_SITE + 1)]:
        got = handed[name]
        # Its site's seed held the release: it is handed at least that one,
        # at the seed's LAN address, and never a device of the other site.
        assert (f"{name[0]}1", sites.site_addr(sites.site_of(name), 0)) in got, (name, got)
        assert all(peer[0] == name[0] for peer, _ in got), (name, got)


def test_the_releaser_sends_about_one_copy_per_site(two_sites: dict) -> None:
    # fleetpush_chunk_bytes_served over both deployments (the seeds included).
    assert two_sites["releaser_chunk_bytes"] <= 1.2 * SIZE * 2
    got = two_sites["device_bytes_from_peers"] + two_sites["device_bytes_from_releaser"]
    assert got == 2 * PER_SITE * SIZE
    assert two_sites["device_bytes_from_peers"] >= 2 * (PER_SITE - 1) * SIZE * 0.8
