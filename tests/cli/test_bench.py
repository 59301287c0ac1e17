"""A small `fleetpush bench` run: every JSON key present and positive (no targets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from fleetpush.protocol.hashing import available_algorithms

pytestmark = pytest.mark.slow

KEYS = [
    "raw_tcp_bps",
    "single_sha256_bps",
    "hash_sha256_bps",
    "fanout_bps",
    "fanout_devices",
    "push_latency_p50_s",
    "push_latency_p99_s",
    "push_latency_max_s",
    "server_peak_rss_bytes",
    "client_peak_rss_bytes",
]


def test_small_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = run_cli(
        "bench",
        "--size",
        "64MiB",
        "--fanout-size",
        "4MiB",
        "--devices",
        "20",
        "--repeat",
        "1",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path),
        timeout=600,
    )
    assert r.code == 0, r.err
    doc = json.loads(out.read_text())
    keys = KEYS + (["single_blake3_bps"] if "blake3" in available_algorithms() else [])
    for key in keys:
        assert key in doc, key
        assert isinstance(doc[key], int | float) and doc[key] > 0, (key, doc[key])
    assert doc["fanout_devices"] == 20
    assert doc["push_latency_p50_s"] <= doc["push_latency_p99_s"] <= doc["push_latency_max_s"]
    for name, ratio in doc["ratios"].items():
        assert ratio > 0, name
    assert "raw_tcp_bps" in r.out and "ratio" in r.out  # the printed table
    assert not list(tmp_path.glob("fleetpush-bench-*"))  # the workspace is removed


def test_rollout_bench_halts_a_failing_deployment_and_completes_a_healthy_one(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rollout.json"
    r = run_cli(
        "bench",
        "--rollout",
        "--devices",
        "60",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path),
        timeout=300,
    )
    assert r.code == 0, r.err
    doc = json.loads(out.read_text())
    assert doc == json.loads(r.out)  # the same document on stdout
    assert doc["targets"] == {
        "affected_at_most_25": True,
        "halt_within_5s": True,
        "healthy_completes_4_phases_without_halt": True,
    }, doc
    assert doc["affected"] == doc["affected_by_devices"] >= doc["min_executed"]
    assert doc["failing_counts"]["pending"] == 60 - doc["affected"]
    assert doc["halt_events"] == 1 and doc["false_halts"] == 0
    assert doc["healthy_counts"] == {"succeeded": 60}
    assert not list(tmp_path.glob("fleetpush-rollout-*"))  # the workspace is removed
