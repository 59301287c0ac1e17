"""The bench's parts on their own: per-round ratios, the delta mutations and
the byte-counting relay (real TCP on 127.0.0.1)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from fleetpush.bench.baseline import make_file
from fleetpush.bench.delta import mutate
from fleetpush.bench.figures import Figures
from fleetpush.bench.relay import Relay


def test_ratios_pair_figures_of_the_same_round_only() -> None:
    f = Figures()
    f.ratio("dl_vs_ceiling", "dl_bps", "ceiling_bps")
    f.ratio("speed_vs_rsync", "fp_s", "rsync_s", durations=True)
    for rnd, (dl, ceiling) in enumerate([(100, 200), (300, 300), (50, 1000)], start=1):
        f.round = rnd
        f.add("dl_bps", dl)
        f.add("ceiling_bps", ceiling)
    f.round = 4
    f.add("ceiling_bps", 1)  # a round without a download pairs with nothing
    f.add("fp_s", 2.0)
    f.add("rsync_s", 3.0)
    doc = f.document()
    assert f.per_round("dl_vs_ceiling") == [0.5, 1.0, 0.05]
    assert doc["ratios"]["dl_vs_ceiling"] == 0.5
    assert doc["ratio_ranges"]["dl_vs_ceiling"]["min"] == 0.05
    assert doc["ratio_ranges"]["dl_vs_ceiling"]["max"] == 1.0
    assert doc["ratios"]["speed_vs_rsync"] == 1.5  # rsync's seconds over ours
    assert doc["dl_bps"] == 100 and doc["ranges"]["dl_bps"] == [50, 300]
    assert doc["runs"]["ceiling_bps"] == [200, 300, 1000, 1]


def test_counts_stay_exact_and_rates_are_rounded() -> None:
    f = Figures()
    f.add("delta_wire_bytes", 187_730_447)
    f.add("net_bps", 607_612_345.678_9)
    doc = f.document()
    assert doc["delta_wire_bytes"] == 187_730_447 and isinstance(doc["delta_wire_bytes"], int)
    assert doc["net_bps"] == 607_612_000.0


def test_a_ratio_with_no_common_round_is_left_out() -> None:
    f = Figures()
    f.ratio("a_vs_b", "a", "b")
    f.add("a", 1.0)
    assert "a_vs_b" not in f.document()["ratios"]


@pytest.mark.parametrize(
    ("kind", "grown", "same"),
    [
        ("insert", 3 * 4096, False),
        ("scattered", 20 * 1024, False),
        ("overwrite", 0, False),
        ("identical", 0, True),
    ],
)
def test_mutations_change_the_file_as_the_scenario_says(
    tmp_path: Path, kind: str, grown: int, same: bool
) -> None:
    src, dst = tmp_path / "v1", tmp_path / "v2"
    make_file(src, 1 << 20, seed=3)
    mutate(kind, src, dst, seed=7)
    a, b = src.read_bytes(), dst.read_bytes()
    assert len(b) == len(a) + grown
    assert (a == b) == same
    if kind == "overwrite":
        changed = sum(x != y for x, y in zip(a, b, strict=True))
        assert 0 < changed <= len(a) // 100


def test_relay_counts_both_directions(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            got = b""
            while len(got) < 1000:
                got += conn.recv(65536)
            conn.sendall(b"x" * 300_000)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with Relay(server.getsockname()) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
            c.sendall(b"y" * 1000)
            got = 0
            while got < 300_000:
                chunk = c.recv(65536)
                assert chunk
                got += len(chunk)
        t.join(10)
        assert relay.counts() == (300_000, 1000)
        relay.reset()
        assert relay.counts() == (0, 0)
    server.close()
