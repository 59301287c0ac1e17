"""`fleetpush bench`: throughput, fan-out, push latency and memory on loopback."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fleetpush.protocol import FleetpushError

from .console import fail
from .exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """``1GiB``, ``64MiB``, ``500MB``, ``1048576`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1GiB, 64MiB, 500MB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="measure throughput, fan-out, push latency and memory on loopback",
        description=(
            "Runs a releaser (own process) and device workers on 127.0.0.1 and measures: a "
            "plain-socket transfer of --size (raw_tcp_bps, the baseline), the machine's sha256 "
            "rate, one device downloading a --size release through the real protocol and "
            "updater download path (sha256, and blake3 when installed), --devices devices "
            "downloading a --fanout-size release at once, push latency to --devices devices, "
            "and peak RSS of the releaser and of a device. Figures are medians of --repeat runs."
        ),
    )
    p.add_argument("--size", type=parse_size, default="1GiB", help="single download size (1GiB)")
    p.add_argument(
        "--fanout-size", type=parse_size, default="10MiB", help="fan-out release (10MiB)"
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="fan-out and push devices (100); with --rollout the simulated fleet (1000)",
    )
    p.add_argument(
        "--rollout",
        action="store_true",
        help=(
            "instead: a deployment over a simulated fleet whose devices report trial outcomes: "
            "30%% fail (must halt at 5%% once 20 finished, with at most 25 devices affected, "
            "within 5 s), then a healthy release (must complete 4 phases with no halt)"
        ),
    )
    p.add_argument("--repeat", type=int, default=3, help="runs; figures are medians (3)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON document here")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="where the temporary workspace goes")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from fleetpush.bench.harness import BenchOptions, run_bench

    if args.rollout:
        return _rollout(args)
    args.devices = 100 if args.devices is None else args.devices
    if args.devices < 1 or args.repeat < 1:
        print("fleetpush: --devices and --repeat must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    opts = BenchOptions(
        size=args.size,
        fanout_size=args.fanout_size,
        devices=args.devices,
        repeat=args.repeat,
        workdir=args.workdir,
    )

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        doc = run_bench(opts, report)
    except FleetpushError as e:
        return fail(e)
    print_table(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return EXIT_OK


def _rollout(args: argparse.Namespace) -> int:
    """``--rollout``: prints the JSON document; exit 1 if a target was missed."""
    from fleetpush.bench.rollout import RolloutOptions, run_rollout_bench

    devices = 1000 if args.devices is None else args.devices
    if devices < 40:
        print("fleetpush: bench --rollout: --devices must be at least 40", file=sys.stderr)
        return EXIT_USAGE

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        doc = run_rollout_bench(RolloutOptions(devices=devices, workdir=args.workdir), report)
    except FleetpushError as e:
        return fail(e)
    text = json.dumps(doc, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    missed = [name for name, met in doc["targets"].items() if not met]
    if missed:
        print(f"fleetpush: bench --rollout: target missed: {', '.join(missed)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def print_table(doc: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(key: str) -> float:
        v = doc.get(key)
        return float(v) if isinstance(v, int | float) else 0.0

    t = Table(title=f"fleetpush bench (median of {doc.get('repeat')} runs)", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("ratio", justify="right")
    raw = num("raw_tcp_bps")
    for key in (
        "raw_tcp_bps",
        "hash_sha256_bps",
        "single_sha256_bps",
        "single_blake3_bps",
        "fanout_bps",
    ):
        if key in doc:
            ratio = f"{num(key) / raw:.2f} x raw_tcp" if raw and key != "raw_tcp_bps" else ""
            if key == "single_sha256_bps" and num("hash_sha256_bps"):
                ratio += f", {num(key) / num('hash_sha256_bps'):.2f} x hash_sha256"
            t.add_row(key, f"{num(key) / 1e6:.1f} MB/s", ratio)
    t.add_row("fanout_devices", str(doc.get("fanout_devices")), "")
    for key in ("push_latency_p50_s", "push_latency_p99_s", "push_latency_max_s"):
        t.add_row(key, f"{num(key) * 1e3:.1f} ms", "")
    for key in ("server_peak_rss_bytes", "client_peak_rss_bytes", "fanout_client_peak_rss_bytes"):
        t.add_row(key, f"{num(key) / (1 << 20):.1f} MiB", "")
    Console(highlight=False).print(t)
