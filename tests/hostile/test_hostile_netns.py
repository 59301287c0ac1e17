"""Real link faults between two network namespaces (issue 6; root, ``ip netns``, tc tbf).

The releaser runs in namespace a behind a counting proxy on 192.0.2.1, the
device in namespace b; they are joined by a veth pair shaped to 20 Mbit/s with
tbf (this kernel has no netem). A 20 MiB release must be staged byte-exact
through a 10 s cut and through a flapping link, with less than 5 % of the
release sent twice (counted by the proxy: every byte written towards the device,
including those lost with a dead connection).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from fp_trees import make_release_dir, tree_digests
from hostile_fleet import publish_approved

HERE = Path(__file__).resolve().parent
FLEET = str(HERE / "hostile_fleet.py")
# hostile_fleet.py run as a script imports the test support (tests/support/fp_*.py).
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(HERE.parent / "support")}
SIZE = 20 * 1024 * 1024
CHUNK = 256 * 1024


def test_netns_pair_cleans_up_even_when_the_body_fails() -> None:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with pytest.raises(RuntimeError), netns.NetnsPair() as pair:
        names = pair.ns_a, pair.ns_b
        server = (
            "import socket\n"
            "c, _ = socket.create_server(('192.0.2.1', 9000)).accept()\n"
            "c.sendall(b'ok')\n"
        )
        client = (
            "import socket, time\n"
            "for _ in range(50):\n"
            "    try:\n"
            "        print(socket.create_connection(('192.0.2.1', 9000), 2).recv(2).decode())\n"
            "        break\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
        )
        pair.popen("a", [sys.executable, "-c", server])
        assert pair.run("b", [sys.executable, "-c", client]).stdout.strip() == "ok"
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def _start(pair: netns.NetnsPair, tmp_path: Path, *timeouts: str) -> tuple[subprocess.Popen, int]:
    src = make_release_dir(tmp_path / "src", SIZE)
    publish_approved(tmp_path / "data", src, "2.0.0", chunk_size=CHUNK)
    pair.limit_rate(20)
    rel = pair.popen(
        "a",
        [sys.executable, FLEET, "releaser", "--host", netns.ADDR_A, "--data-dir",
         str(tmp_path / "data"), *timeouts],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=SCRIPT_ENV,
    )  # fmt: skip
    assert rel.stdout is not None
    line = rel.stdout.readline()
    assert line, "releaser did not start"
    return rel, json.loads(line)["port"]


def _device(pair: netns.NetnsPair, tmp_path: Path, port: int) -> subprocess.Popen:
    return pair.popen(
        "b",
        [sys.executable, FLEET, "device", "--host", netns.ADDR_A, "--port", str(port),
         "--root", str(tmp_path / "dev"), "--deadline", "110"],
        stdout=subprocess.PIPE, env=SCRIPT_ENV,
    )  # fmt: skip


def _finish(rel: subprocess.Popen, dev: subprocess.Popen, tmp_path: Path) -> tuple[dict, dict]:
    out, _ = dev.communicate(timeout=120)
    assert dev.returncode == 0, "device failed"
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert rel.stdin is not None and rel.stdout is not None
    rel.stdin.close()
    counters = json.loads(rel.stdout.read().decode().strip().splitlines()[-1])
    rel.wait(timeout=20)
    assert result["staged"] == tree_digests(tmp_path / "src"), "staged bytes differ"
    return result, counters


def _wait_tx(pair: netns.NetnsPair, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pair.tx_bytes("a") < at_least:
        assert time.monotonic() < deadline, "download did not progress"
        time.sleep(0.1)


@pytest.mark.netns
@pytest.mark.slow
def test_20mb_over_20mbit_link_cut_for_10s(netns_pair: netns.NetnsPair, tmp_path: Path) -> None:
    """The link goes down for 10 s half-way. The releaser's 3 s send deadline drops the
    session during the cut, so the device must reconnect and resume from its staged chunks."""
    pair = netns_pair
    rel, port = _start(pair, tmp_path, "--send-timeout", "3", "--frame-timeout", "3")
    base = pair.tx_bytes("a")
    started = time.monotonic()
    dev = _device(pair, tmp_path, port)
    _wait_tx(pair, base + SIZE // 2, 40)
    pair.link_down()
    time.sleep(10)
    pair.link_up()
    result, counters = _finish(rel, dev, tmp_path)
    resent = (counters["bytes_down"] - SIZE) / SIZE
    print(
        f"\n10 s cut: {time.monotonic() - started:.1f}s, {result['attempts']} attempts, "
        f"{counters['connections']} connections, re-sent {resent:.2%}"
    )
    assert counters["connections"] >= 2, "the cut should have cost the session"
    assert resent < 0.05


@pytest.mark.netns
@pytest.mark.slow
def test_20mb_over_a_flapping_link(netns_pair: netns.NetnsPair, tmp_path: Path) -> None:
    """Down 1.5 s every 4 s for the whole download (default deadlines: TCP rides it out)."""
    pair = netns_pair
    rel, port = _start(pair, tmp_path)
    started = time.monotonic()
    dev = _device(pair, tmp_path, port)
    flaps = 0
    while dev.poll() is None and time.monotonic() - started < 100:
        time.sleep(2.5)
        if dev.poll() is not None:
            break
        pair.link_down()
        time.sleep(1.5)
        pair.link_up()
        flaps += 1
    result, counters = _finish(rel, dev, tmp_path)
    resent = (counters["bytes_down"] - SIZE) / SIZE
    print(
        f"\nflapping: {time.monotonic() - started:.1f}s, {flaps} flaps, "
        f"{result['attempts']} attempts, re-sent {resent:.2%}"
    )
    assert flaps >= 3
    assert resent < 0.05
