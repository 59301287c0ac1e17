"""`fleetpush bench`: throughput, fan-out, push latency and memory on loopback."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

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
            "Runs a releaser (fleetpush server, own process) and devices on 127.0.0.1 and "
            "measures, in --rounds interleaved rounds (figures are medians, with min-max under "
            "'ranges'; every ratio is taken round by round): the ceilings (network into "
            "/dev/null, the disk-write rate into the download's destination right before each "
            "download, sha256/blake3 hashing; ceiling = min of the three); the download phase "
            "alone (single_<algo>); the end-to-end update (e2e_<algo>: `fleetpush update` as a "
            "process, request to installed and fsynced, with device and releaser CPU s/GiB and "
            "device peak RSS); with --compare, rsync+fsync and nginx->curl+sha256 of the same "
            "file (vs_rsync, vs_http); --devices devices downloading a --fanout-size release at "
            "once against a raw --devices-connection baseline, and push latency; the delta "
            "scenarios (bytes on the wire counted by a relay); and (index) the indexing time of "
            "`fleetpush release publish` of --size, per round. Scenarios an option of this "
            "build lacks (e.g. --chunking) are listed under 'skipped'."
        ),
    )
    p.add_argument("--size", type=parse_size, default="1GiB", help="single release size (1GiB)")
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
    p.add_argument(
        "--idle",
        action="store_true",
        help=(
            "instead: --devices (10000) idle authenticated devices from worker processes: "
            "the releaser's RSS per device, its idle CPU, and a push to all of them "
            "(targets: <= 20 KiB/device, <= 5%% of a core, p99 <= 2 s)"
        ),
    )
    p.add_argument(
        "--idle-seconds", type=float, default=60.0, help="--idle: idle window sampled (60)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="--idle: device processes (1 per 10000)"
    )
    p.add_argument(
        "--server-heartbeat",
        type=float,
        default=None,
        help="--idle: the releaser's --heartbeat (its default)",
    )
    p.add_argument(
        "--p2p",
        action="store_true",
        help=(
            "fan-out also with LAN peer delivery, in the same rounds right after the plain "
            "one: devices serve each other (doubling waves, the releaser as tracker) and the "
            "releaser's egress is reported for both. On loopback peers cannot beat the "
            "releaser on bandwidth (every device shares this machine's cores): the figure "
            "that matters is the egress"
        ),
    )
    p.add_argument(
        "--rounds",
        "--repeat",
        dest="repeat",
        type=int,
        default=3,
        help="interleaved rounds; figures are medians (3)",
    )
    p.add_argument(
        "--scenarios",
        type=_scenarios,
        default=",".join(SCENARIOS),
        help=f"comma-separated parts to run, of {','.join(SCENARIOS)} (all)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also rsync+fsync and nginx->curl+sha256 in the same rounds (when installed)",
    )
    p.add_argument(
        "--delta",
        type=_deltas,
        default=",".join(DELTAS),
        help=(
            "delta scenarios, of insert (256MiB, 3 x 4KiB inserted), scattered (64MiB, 20 "
            "insertions), overwrite (1GiB, 1%% overwritten; vs rsync with --compare), "
            "identical (a re-publish) (all)"
        ),
    )
    p.add_argument(
        "--delta-size",
        type=parse_size,
        default=None,
        help="one file size for every delta scenario instead of the sizes above",
    )
    p.add_argument(
        "--chunking",
        choices=("fixed", "cdc"),
        default=None,
        help=(
            "publish the download/e2e releases with this `release publish --chunking` "
            "(default: its own default; the delta and index scenarios run every chunking)"
        ),
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON document here")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="where the temporary workspace goes")
    p.set_defaults(func=_bench)


SCENARIOS = ("download", "e2e", "index", "fanout", "delta")
DELTAS = ("insert", "scattered", "overwrite", "identical")


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {','.join(bad) or text!r} (choose from {','.join(allowed)})"
        )
    return chosen


def _scenarios(text: str) -> tuple[str, ...]:
    return _choices(text, SCENARIOS, "scenario")


def _deltas(text: str) -> tuple[str, ...]:
    return _choices(text, DELTAS, "delta scenario")


def _bench(args: argparse.Namespace) -> int:
    from fleetpush.bench.harness import BenchOptions, run_bench

    if args.rollout:
        return _rollout(args)
    if args.idle:
        return _idle(args)
    args.devices = 100 if args.devices is None else args.devices
    if args.devices < 1 or args.repeat < 1:
        print("fleetpush: bench: --devices and --rounds must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    opts = BenchOptions(
        size=args.size,
        fanout_size=args.fanout_size,
        devices=args.devices,
        repeat=args.repeat,
        workdir=args.workdir,
        scenarios=args.scenarios,
        compare=args.compare,
        delta=args.delta,
        delta_size=args.delta_size,
        chunking=args.chunking,
        p2p=args.p2p,
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


def _idle(args: argparse.Namespace) -> int:
    """``--idle``: prints the JSON document; exit 1 if a target was missed."""
    from fleetpush.bench.idle import IdleOptions, run_idle_bench

    devices = 10_000 if args.devices is None else args.devices
    if devices < 1 or (args.workers is not None and not 1 <= args.workers <= 200):
        print("fleetpush: bench --idle: --devices >= 1, --workers 1..200", file=sys.stderr)
        return EXIT_USAGE
    opts = IdleOptions(
        devices=devices,
        workers=args.workers,
        idle_seconds=args.idle_seconds,
        heartbeat=args.server_heartbeat,
        workdir=args.workdir,
    )

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        doc = run_idle_bench(opts, report)
    except FleetpushError as e:
        return fail(e)
    text = json.dumps(doc, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    missed = [name for name, met in doc["targets"].items() if not met]
    if missed:
        print(f"fleetpush: bench --idle: target missed: {', '.join(missed)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _fmt(key: str, v: float) -> str:
    if key.endswith("_bps"):
        return f"{v / 1e6:.1f} MB/s"
    if key.startswith("push_latency"):
        return f"{v * 1e3:.1f} ms"
    if key.endswith("_s") or key.endswith("_per_gib"):
        return f"{v:.3f} s" + ("/GiB" if key.endswith("_per_gib") else "")
    if key.endswith("rss_bytes"):
        return f"{v / (1 << 20):.1f} MiB"
    if key.endswith("_bytes"):
        return f"{v:,.0f} B"
    if key.endswith("_pct"):
        return f"{v:.3f} %"
    return f"{v:g}"


def print_table(doc: dict[str, Any]) -> None:
    """The figures (median, min-max) and the ratios, as two tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    rounds = doc.get("rounds", doc.get("repeat"))
    t = Table(title=f"fleetpush bench (median of {rounds} rounds)", title_justify="left")
    t.add_column("figure")
    t.add_column("median", justify="right")
    t.add_column("min - max", justify="right")
    for key, (lo, hi) in sorted(doc.get("ranges", {}).items()):
        t.add_row(key, _fmt(key, doc[key]), f"{_fmt(key, lo)} - {_fmt(key, hi)}")
    for key in ("server_peak_rss_bytes", "client_peak_rss_bytes", "fanout_client_peak_rss_bytes"):
        if key in doc:
            t.add_row(key, _fmt(key, doc[key]), "")
    r = Table(title="ratios (per round, then the median)", title_justify="left")
    r.add_column("ratio")
    r.add_column("median", justify="right")
    r.add_column("min - max", justify="right")
    r.add_column("of / to")
    for key, value in sorted(doc.get("ratios", {}).items()):
        how = doc["ratio_ranges"][key]
        of_to = f"{how['to']} / {how['of']}" if how["durations"] else f"{how['of']} / {how['to']}"
        r.add_row(key, f"{value:.3f}", f"{how['min']:.3f} - {how['max']:.3f}", of_to)
    console = Console(highlight=False, width=160)
    console.print(t)
    console.print(r)
    skipped = dict(doc.get("skipped", {}))
    skipped.update({f"delta_{k}": v for k, v in doc.get("delta", {}).get("skipped", {}).items()})
    for name, why in sorted(skipped.items()):
        console.print(f"skipped {name}: {why}")
