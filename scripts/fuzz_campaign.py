#!/usr/bin/env python3
"""A long fuzz campaign over FrameDecoder, Connection and the msgpack decoders.

Run by hand, not by CI (issue 6). The target is ``drive()`` from
tests/hostile/hostile_proto.py; its invariant is h11's: any input may raise
only ``FleetpushError`` and must never hang. Every other exception is a
finding: the input is saved under ``--findings`` (one file per distinct
exception site) and the campaign goes on. Turn each finding into a case in
tests/hostile/test_hostile_fuzz_regressions.py.

Engines:

- ``atheris`` (coverage-guided libFuzzer; ``pip install atheris``): the
  protocol package is instrumented, the corpus starts from real frames;
- ``mutate`` (no dependencies): a fast random mutation loop over the same
  seeds (bit flips, byte sets, splices, interesting integers, truncation);
- ``live`` (scripts/fuzz_live.py): a real ``fleetpush server`` process, K
  workers sending mutated messages over valid sessions, an honest prober and
  the releaser's RSS; prints one JSON object, exit 1 on any problem (issue 10).

Example (the run recorded in specs/THREATS.md)::

    nice -n 15 /work/venv/bin/python scripts/fuzz_campaign.py \\
        --engine atheris --runs 1200000 --max-time 3000 --findings /tmp/fuzz-findings

Prints the number of inputs, the time and the findings at the end.

The live campaign of specs/THREATS.md (5 minutes, 8 workers)::

    nice -n 5 /work/venv/bin/python scripts/fuzz_campaign.py --engine live --seconds 300
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "hostile"))


class Campaign:
    """Counts inputs and keeps one saved input per distinct crash site."""

    def __init__(self, findings: Path, drive: Callable[[bytes], None]) -> None:
        self.findings = findings
        self.drive = drive
        self.seen: set[str] = set()
        self.count = 0
        self.started = time.monotonic()

    def target(self, data: bytes) -> None:
        self.count += 1
        try:
            self.drive(data)
        except Exception as e:
            self.record(data, e)

    def record(self, data: bytes, exc: BaseException) -> None:
        """Save one input per distinct (exception type, innermost frame) site."""
        tb = traceback.extract_tb(exc.__traceback__)
        site = f"{type(exc).__name__}@{tb[-1].filename}:{tb[-1].lineno}" if tb else repr(exc)
        if site in self.seen:
            return
        self.seen.add(site)
        name = hashlib.sha256(data).hexdigest()[:16]
        (self.findings / f"crash-{name}.bin").write_bytes(data)
        (self.findings / f"crash-{name}.txt").write_text(
            f"{site}\n{data.hex()}\n\n{''.join(traceback.format_exception(exc))}"
        )
        print(f"FINDING {site} -> crash-{name}.bin", flush=True)

    def report(self, engine: str) -> None:
        elapsed = time.monotonic() - self.started
        print(
            f"DONE engine={engine} inputs={self.count} seconds={elapsed:.0f} "
            f"findings={len(self.seen)}",
            flush=True,
        )


# --- the dependency-free engine ---------------------------------------------------

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


def mutate_bytes(rng: random.Random, data: bytearray, corpus: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2 and len(data) > 4:
            i = rng.randrange(len(data) - 4)
            val = rng.choice(_INTERESTING)
            fmt = rng.choice((">B", ">H", ">I"))
            width = struct.calcsize(fmt)
            data[i : i + width] = struct.pack(fmt, val & ((1 << (8 * width)) - 1))
        elif op == 3 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 4:
            other = rng.choice(corpus)
            if other:
                a = rng.randrange(len(other))
                data[rng.randrange(len(data) + 1) :] = other[a : a + rng.randint(1, 64)]
        elif op == 5 and len(data) > 2:
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randint(1, 32))
            data[i:i] = data[i:j]
        elif op == 6 and data:
            i = rng.randrange(len(data))
            del data[i : i + rng.randint(1, 16)]
        else:
            data[0:2] = bytes([rng.randrange(6), rng.randrange(256)])
    return data


def _run_mutate(c: Campaign, seeds: list[bytes], runs: int, max_time: float, seed: int) -> None:
    rng = random.Random(seed)
    corpus = list(seeds)
    deadline = time.monotonic() + max_time
    for s in seeds:
        c.target(s)
    while c.count < runs and time.monotonic() < deadline:
        for _ in range(1000):
            c.target(bytes(mutate_bytes(rng, bytearray(rng.choice(corpus)), corpus)))
        if c.count % 100_000 < 1000:
            rate = c.count / max(time.monotonic() - c.started, 1e-9)
            print(f"#{c.count} inputs, {rate:.0f}/s, {len(c.seen)} findings", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--engine", choices=("atheris", "mutate", "live"), default="atheris")
    ap.add_argument("--runs", type=int, default=1_200_000)
    ap.add_argument("--max-time", type=float, default=3600.0, help="seconds")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--corpus", type=Path, help="atheris corpus dir (default: findings/corpus)")
    ap.add_argument("--seed", type=int, default=1)
    live = ap.add_argument_group("live engine")
    live.add_argument("--seconds", type=float, default=300.0, help="fuzzing time")
    live.add_argument("--workers", type=int, default=8, help="fuzzer connections at once")
    live.add_argument("--warmup", type=float, default=3.0, help="seconds before the RSS start")
    live.add_argument("--settle", type=float, default=5.0, help="seconds after the fuzzer ends")
    live.add_argument("--pause-ms", type=float, default=5.0, help="max pause between messages")
    live.add_argument("--max-latency-ms", type=float, default=200.0)
    live.add_argument("--workdir", type=Path, help="data dir and log (default: a new temp dir)")
    args = ap.parse_args()
    if args.engine == "live":
        import json

        from fuzz_live import run, summary

        report, code = run(args)
        print(json.dumps(report), flush=True)
        print(summary(report), file=sys.stderr)
        return code
    args.findings.mkdir(parents=True, exist_ok=True)

    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["fleetpush", "hostile_proto"]):
            from hostile_proto import drive, seed_corpus
        c = Campaign(args.findings, drive)
        corpus = args.corpus or (args.findings / "corpus")
        corpus.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(seed_corpus()):
            (corpus / f"seed-{i:03d}").write_bytes(s)
        # libFuzzer ends the process itself; its final stats give the count too.
        atexit.register(c.report, "atheris")
        atheris.Setup(
            [
                sys.argv[0],
                f"-runs={args.runs}",
                f"-max_total_time={int(args.max_time)}",
                "-timeout=10",
                "-rss_limit_mb=1024",
                "-max_len=70000",
                "-print_final_stats=1",
                str(corpus),
            ],
            c.target,
        )
        atheris.Fuzz()
        return 0

    from hostile_proto import drive, seed_corpus

    c = Campaign(args.findings, drive)
    _run_mutate(c, seed_corpus(), args.runs, args.max_time, args.seed)
    c.report("mutate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
