"""Peer delivery on a LAN of real processes (issue 18; root, ip netns, a Linux bridge).

A real ``fleetpush server`` and 8 real ``fleetpush agent`` processes with
``p2p = true``, each in its own namespace on one bridge (tests/netns/lan.py):
``liar`` serves release files overwritten on disk after it installed them,
``mute`` announces a p2p address where a listener accepts and never answers.
The 6 honest devices get the release in a phased deployment. The 50-device run is
``scripts/p2p_lan.py --devices 50 --size 64MiB --json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lan
import pytest

pytestmark = pytest.mark.netns

SIZE = 4 << 20
CHUNK = 512 << 10
#: chunks the asker requests of one peer at once (client/p2p_fetch.py PER_PEER):
#: the most a liar can have sent before the asker saw its first bad chunk.
PER_PEER = 8


@pytest.fixture(scope="module")
def lan_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    reason = lan.unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    work = tmp_path_factory.mktemp("lan")
    # Every wait inside is bounded (agents connecting, each deployment).
    return lan.run(work, devices=8, size=SIZE, chunk=CHUNK, timeout=180)


def test_every_device_installs_the_release_byte_for_byte(lan_run: dict) -> None:
    names = ["liar", "mute", *(f"dev-{i:03d}" for i in range(1, 7))]
    assert lan_run["installed"] == sorted(names)
    src = Path(lan_run["src"])
    for name in names[1:]:  # the liar's files were overwritten on purpose
        app = Path(lan_run["work"]) / "devices" / name / "app"
        for f in ("a.bin", "b.bin"):  # 0 corrupted bytes
            assert (app / f).read_bytes() == (src / f).read_bytes(), (name, f)


def test_the_liar_is_dropped_after_its_first_bad_chunk_and_reported(lan_run: dict) -> None:
    events = lan_run["bad_peer_events"]
    assert len(events) == 1 and events[0]["device_id"] == "liar"
    assert events[0]["reason"] == "corrupt"
    reporter = events[0]["reporter"]
    # One report: once reported the releaser never hands the liar out again.
    assert lan_run["p2p_bad_rows"] == [["liar", "2.0.0", reporter, "corrupt"]]
    # Dropped at its first bad chunk: no more than the one request in flight.
    uploaded = lan_run["liar_uploaded"]
    assert 1 <= uploaded["chunks_uploaded"] <= PER_PEER
    # The mute peer was handed out and dialled; it withholds, so it is
    # replaced (the releaser or another peer serves), never reported as a liar.
    assert lan_run["mute_links_accepted"] >= 1
    assert all(row[0] != "mute" for row in lan_run["p2p_bad_rows"])


def test_the_releaser_sends_the_release_about_once(lan_run: dict) -> None:
    # fleetpush_chunk_bytes_served over the honest devices' deployment.
    egress = lan_run["releaser_chunk_bytes"]
    assert egress <= 1.2 * SIZE
    assert lan_run["releaser_wire_bytes"] <= lan_run["egress_limit_bytes"] * 1.1  # + TCP/IP
    honest = lan_run["honest_devices"]
    got = lan_run["device_bytes_from_peers"] + lan_run["device_bytes_from_releaser"]
    assert got == honest * SIZE
    # What the releaser did not send came from peers.
    assert lan_run["device_bytes_from_peers"] >= honest * SIZE - egress
    assert lan_run["delivered_bytes_metric"]["peers"] >= lan_run["device_bytes_from_peers"]


def test_the_operator_sees_the_byte_split_and_the_bad_peer(lan_run: dict) -> None:
    shown = lan_run["deploy_show"]
    assert shown["delivery"] == {
        "from_peers": lan_run["device_bytes_from_peers"],
        "from_releaser": lan_run["device_bytes_from_releaser"],
        "devices_reported": lan_run["honest_devices"],
    }
    text = lan_run["deploy_show_text"]
    line = next(r for r in text.splitlines() if r.strip().startswith("delivery"))
    assert "from peers" in line and f"{lan_run['honest_devices']} devices reported" in line
    by_id = {d["device_id"]: d for d in lan_run["devices_view"]}
    assert by_id["liar"]["bad_peer_reports"] == 1
    assert by_id["dev-001"]["bad_peer_reports"] == 0


def test_the_lan_is_removed_even_when_the_body_fails(tmp_path: Path) -> None:
    reason = lan.unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with pytest.raises(RuntimeError), lan.Lan() as net:
        names = [net.hub, net.add_device(0), net.add_device(1)]
        # The two devices reach each other across the bridge.
        serve = f"import socket; socket.create_server(({lan.device_addr(1)!r}, 9000)).accept()"
        net.popen(names[2], [sys.executable, "-c", serve], tmp_path / "serve.log")
        ask = (
            "import socket, time\n"
            "for _ in range(50):\n"
            "    try:\n"
            f"        socket.create_connection(({lan.device_addr(1)!r}, 9000), 2); print('ok')\n"
            "        break\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
        )
        assert net.run(names[1], [sys.executable, "-c", ask], timeout=30).stdout.strip() == "ok"
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed.split() for n in names)
