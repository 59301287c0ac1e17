"""Peer delivery's failure rules with real agents on a bridge LAN (issue 18; root, ip netns).

Four real ``fleetpush agent`` processes, each in its own namespace on one
bridge with a real ``fleetpush server`` (tests/netns/lan.py): ``h1`` and
``h2`` (p2p on, uploads paced to 256 KiB/s each) install 2.0.0 first;
``asker`` (p2p on) then downloads it from them, and both holder agents are
killed mid-download; ``plain`` has p2p off. Meanwhile a stranger on the LAN
(tests/netns/stranger.py, a real process in plain's namespace) asks ``h1``
for chunks without a valid peer token.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lan
import pytest

pytestmark = pytest.mark.netns

SIZE = 6 << 20
CHUNK = 256 << 10
HERE = Path(__file__).resolve().parent
NAMES = ["h1", "h2", "asker", "plain"]


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = lan.unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    work = tmp_path_factory.mktemp("lanfaults")
    out: dict[str, Any] = {"work": work}
    slow = {"p2p_max_rate": 256 * 1024}
    with lan.Lan() as net:
        fleet = lan.Fleet(
            net, work, len(NAMES), SIZE, CHUNK, names=NAMES,
            settings={"h1": slow, "h2": slow, "plain": {"p2p": False}},
        )  # fmt: skip
        fleet.setup()
        fleet.wait_connected(60)
        out["listening"] = {n: fleet.listening(n) for n in NAMES}
        fleet.cli("deploy", "create", lan.APP, lan.VERSION, "--device", "h1", "--device", "h2")
        fleet.wait_installed(["h1", "h2"], 120)
        out["plain_installed_early"] = fleet.installed("plain")

        stranger = net.run(
            fleet.ns["plain"],
            [sys.executable, str(HERE / "stranger.py"), fleet.addr["h1"], str(lan.P2P_PORT),
             "h1", lan.APP, lan.VERSION],
            timeout=60,
        )  # fmt: skip
        assert stranger.returncode == 0, stranger.stderr
        out["stranger"] = json.loads(stranger.stdout)
        out["h1_after_stranger"] = fleet.p2p_status("h1")

        fleet.cli("deploy", "create", lan.APP, lan.VERSION, "--device", "asker")
        # Kill both holders once they have uploaded something to the asker
        # (bounded: the paced upload takes ~12 s; the kill comes well before).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = [fleet.p2p_status(h).get("bytes_uploaded", 0) for h in ("h1", "h2")]
            if sum(up) > 0:
                break
            time.sleep(0.2)
        out["uploaded_before_kill"] = up
        for h in ("h1", "h2"):
            fleet.kill_agent(h)
        fleet.wait_installed(["asker"], 120)
        out["deliveries"] = fleet.cli("events", "--type", "p2p_delivery", "--device", "asker")
        out["asker_status"] = fleet.p2p_status("asker")
        out["status_text"] = {n: fleet.status_text(n) for n in ("asker", "plain")}
        out["bad_rows"] = fleet.bad_rows()
        out["src"] = fleet.src
    return out


def test_a_device_whose_peers_vanish_mid_download_finishes_from_the_releaser(
    faults: dict[str, Any],
) -> None:
    assert sum(faults["uploaded_before_kill"]) > 0
    app = faults["work"] / "devices" / "asker" / "app"
    for f in ("a.bin", "b.bin"):
        assert (app / f).read_bytes() == (faults["src"] / f).read_bytes()
    (split,) = [e["data"] for e in faults["deliveries"]]
    assert split["from_peers"] > 0 and split["from_releaser"] > 0
    assert split["from_peers"] + split["from_releaser"] == SIZE
    assert faults["bad_rows"] == []  # vanished peers are not liars


def test_a_peer_without_a_valid_token_is_refused(faults: dict[str, Any]) -> None:
    refused = faults["stranger"]
    # 3 is FORBIDDEN (protocol/errors.py ErrorCode): nothing is served either way.
    assert refused["no token"].startswith("3: present a peer token first"), refused
    assert refused["forged"].startswith("3: peer token refused"), refused
    assert faults["h1_after_stranger"]["chunks_uploaded"] == 0
    assert faults["h1_after_stranger"]["peers_refused"] >= 1


def test_p2p_off_means_no_listening_port(faults: dict[str, Any]) -> None:
    listening = faults["listening"]
    assert listening["plain"] == []
    for name in ("h1", "h2", "asker"):
        assert any(a.endswith(f":{lan.P2P_PORT}") for a in listening[name]), listening
    assert not faults["plain_installed_early"]


def test_status_shows_the_upload_counters_and_the_last_peer_bytes(faults: dict[str, Any]) -> None:
    (split,) = [e["data"] for e in faults["deliveries"]]
    asker = faults["asker_status"]
    assert asker["port"] == lan.P2P_PORT and asker["last_bytes_from_peers"] == split["from_peers"]
    assert set(asker["last_dropped"].values()) <= {"gone", "slow"}  # the killed holders
    line = next(r for r in faults["status_text"]["asker"].splitlines() if r.startswith("p2p"))
    assert f"port {lan.P2P_PORT}: 0 bytes uploaded; {split['from_peers']} from peers" in line
    line = next(r for r in faults["status_text"]["plain"].splitlines() if r.startswith("p2p"))
    assert line.split() == ["p2p", "-"]
