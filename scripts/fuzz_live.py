#!/usr/bin/env python3
"""The live engine of scripts/fuzz_campaign.py: a real releaser under mutated sessions.

:func:`run` (``fuzz_campaign.py --engine live``) publishes a small approved
release into a fresh data dir, starts ``fleetpush server`` on 127.0.0.1 port
0 (auto enrolment, plain TCP), warms it up, samples its RSS
(``/proc/PID/status``), runs the honest prober (every 0.5 s a fresh device
handshake + ``check_update``, every 6th probe also a one-chunk
``get_chunks``), starts the fuzzer process (scripts/fuzz_live_workers.py) and,
once it has exited and ``--settle`` seconds have passed, samples the RSS
again. The fuzzer runs in its own process so its CPU never delays the honest
measurements. The report is one JSON object; the exit code is 1 if the
releaser died, a probe failed, the slowest probe took over
``--max-latency-ms``, the RSS after is over 110 % of the start, or the
releaser logged a traceback.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in ("tests/hostile", "tests/support"):
    if str(HERE.parent / _p) not in sys.path:
        sys.path.insert(0, str(HERE.parent / _p))

import trio  # noqa: E402
from fleetpush.protocol.messages import CheckUpdate, GetChunks  # noqa: E402
from fp_keys import OPERATOR_KEY, fixed_key, key_hex  # noqa: E402
from fp_trees import make_release_dir  # noqa: E402
from fuzz_live_workers import (  # noqa: E402
    APP,
    HOST,
    NEW,
    OLD,
    FuzzStats,
    Mutator,
    drain,
    handshake,
    hello_for,
)

from fleetpush.net.dial import dial  # noqa: E402

# --- the campaign: releaser, prober, RSS --------------------------------------------------


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_releaser(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``fleetpush server`` on 127.0.0.1:0 (plain TCP), its port and its log file."""
    cli = [sys.executable, "-P", "-m", "fleetpush.cli.main", "server"]
    helptext = subprocess.run([*cli, "--help"], check=False, capture_output=True, text=True).stdout
    log = work / "releaser.log"
    cmd = [
        *cli, "--data-dir", str(work / "data"), "--listen", f"{HOST}:0",
        "--enrollment", "auto", "--operator-key", key_hex(OPERATOR_KEY),
    ]  # fmt: skip
    if "--insecure" in helptext:  # TLS became the default (issue 10, item 14)
        cmd.append("--insecure")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("listening on"):
                return proc, int(line.rsplit(":", 1)[1]), log
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the releaser did not start; see {log}")


class Probes:
    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.chunk_probes = 0
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.not_offered = 0
        #: the slowest answered probe: total, dial (TCP + hello/auth) and check_update, in s
        self.slowest = (0.0, 0.0, 0.0)


PROBE_KEY = fixed_key("fuzz-live-probe")


async def probe_once(port: int, n: int, p: Probes) -> None:
    p.sent += 1
    started = time.monotonic()
    try:
        with trio.fail_after(5):
            async with dial(
                (HOST, port), PROBE_KEY, hello_for("device", PROBE_KEY, "fuzz-probe"),
                timeout=5, name="probe",
            ) as link:  # fmt: skip
                dialed = time.monotonic()
                if link.auth.status != "accepted":
                    raise RuntimeError(f"auth status {link.auth.status}")
                res = await link.peer.request("check_update", CheckUpdate(app=APP, version=OLD))
                if not res.available:
                    p.not_offered += 1
                checked = time.monotonic()
                if n % 6 == 5:
                    chunks, done = await link.peer.request_chunks(
                        GetChunks(app=APP, version=NEW, chunks=[(0, 0)])
                    )
                    got = 0
                    async for chunk in chunks:
                        got += len(chunk.payload)
                    await done()
                    if not got:
                        raise RuntimeError("get_chunks answered with no bytes")
                    p.chunk_probes += 1
        p.answered += 1
        total = time.monotonic() - started
        p.latencies.append(total)
        if total > p.slowest[0]:
            p.slowest = (total, dialed - started, checked - dialed)
    except Exception as e:
        when = round(time.monotonic() - started, 3)
        p.failures.append(f"probe {n} after {when}s: {type(e).__name__}: {e}"[:300])


async def prober(port: int, p: Probes, every: float) -> None:
    n = 0
    nxt = time.monotonic()
    while True:
        await probe_once(port, n, p)
        n += 1
        nxt = max(nxt + every, time.monotonic())
        await trio.sleep_until(trio.current_time() + (nxt - time.monotonic()))


async def warm_up(port: int, workers: int) -> None:
    """One device and one operator session of every corpus message, unmutated."""
    for w, role in ((0, "device"), (1, "operator")):
        key = OPERATOR_KEY if role == "operator" else fixed_key(f"fuzz-dev-{w}")
        pid = f"fuzz-op-{w}" if role == "operator" else f"fuzz-dev-{w}"
        mut = Mutator(random.Random(0), role, workers)
        stats = FuzzStats()
        async with await trio.open_tcp_stream(HOST, port) as stream:
            with trio.fail_after(10):
                await handshake(stream, role, key, pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, stream, stats)
                for msg in mut.base:
                    await stream.send_all(mut.valid(msg))
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def campaign(proc_pid: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    probes = Probes()
    samples: list[int] = []
    t0 = time.monotonic()
    timeline: list[tuple[float, int]] = []  # one sample every ~10 s, for the report

    async def sample() -> None:
        while True:
            if (kb := rss_kb(proc_pid)) is not None:
                samples.append(kb)
                now = time.monotonic() - t0
                if not timeline or now - timeline[-1][0] >= 10:
                    timeline.append((round(now, 1), kb))
            await trio.sleep(0.2)

    fuzz_out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prober, port, probes, 0.5)
        await warm_up(port, args.workers)
        await trio.sleep(args.warmup)
        rss_start = rss_kb(proc_pid)
        nursery.start_soon(sample)
        cmd = [
            sys.executable, str(HERE / "fuzz_live_workers.py"), "--port", str(port),
            "--workers", str(args.workers), "--seconds", str(args.seconds),
            "--seed", str(args.seed), "--pause-ms", str(args.pause_ms),
        ]  # fmt: skip
        with trio.fail_after(args.seconds + 120):
            done = await trio.run_process(cmd, capture_stdout=True, check=False)
        try:
            fuzz_out = json.loads(done.stdout.decode() or "{}")
        except ValueError:
            fuzz_out = {"unparsed": done.stdout.decode(errors="replace")[-500:]}
        fuzz_out["exit_code"] = done.returncode
        await trio.sleep(args.settle)  # every fuzzer socket closed with its process
        rss_after = rss_kb(proc_pid)
        nursery.cancel_scope.cancel()
    if rss_after is not None:
        timeline.append((round(time.monotonic() - t0, 1), rss_after))
    lat = [x * 1000 for x in probes.latencies]
    return {
        "fuzzer": fuzz_out,
        "probes": {
            "sent": probes.sent,
            "answered": probes.answered,
            "chunk_probes": probes.chunk_probes,
            "not_offered": probes.not_offered,
            "failures": probes.failures,
            "latency_ms": {
                "p50": round(statistics.median(lat), 1) if lat else None,
                "p99": round(_pct(lat, 0.99), 1),
                "max": round(max(lat, default=0.0), 1),
                "slowest_dial_and_check": [round(x * 1000, 1) for x in probes.slowest[1:]],
                "over_100": sum(x > 100 for x in lat),
            },
        },
        "rss_kb": {
            "start": rss_start,
            "peak": max(samples, default=rss_start),
            "after": rss_after,
            "after_over_start": round(rss_after / rss_start, 3)
            if rss_start and rss_after
            else None,
            "timeline_s_kb": [list(x) for x in timeline],
        },
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The whole live campaign; returns the report and the exit code."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fp-fuzz-live-"))
    work.mkdir(parents=True, exist_ok=True)
    from fp_releaser import publish

    src = make_release_dir(work / "src", 256 * 1024)
    publish(work / "data", src, NEW, app=APP, approved=True, chunk_size=64 * 1024)
    proc, port, log = start_releaser(work)
    try:
        out = trio.run(campaign, proc.pid, port, args)
        alive = proc.poll() is None
    finally:
        code = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    report: dict[str, Any] = {
        "engine": "live",
        "seed": args.seed,
        "seconds": args.seconds,
        "workers": args.workers,
        "releaser": {
            "alive": alive,
            "exit_code_after_sigterm": code,
            "tracebacks": tracebacks,
            "log": str(log),
        },
        **out,
    }
    problems = []
    if not alive:
        problems.append("the releaser died")
    p = out["probes"]
    if p["failures"] or p["answered"] != p["sent"] or not p["sent"]:
        problems.append(f"{p['sent'] - p['answered']} of {p['sent']} probes failed")
    if p["latency_ms"]["max"] > args.max_latency_ms:
        problems.append(f"slowest probe {p['latency_ms']['max']} ms > {args.max_latency_ms} ms")
    ratio = out["rss_kb"]["after_over_start"]
    if ratio is None or ratio > 1.10:
        problems.append(f"RSS after the fuzzer is {ratio} x the start (limit 1.10)")
    if tracebacks:
        problems.append(f"{tracebacks} traceback(s) in the releaser log")
    report["problems"] = problems
    return report, 1 if problems else 0


def summary(r: dict[str, Any]) -> str:
    p, m, f = r["probes"], r["rss_kb"], r["fuzzer"]
    return (
        f"live fuzz {r['seconds']}s x{r['workers']}: releaser alive={r['releaser']['alive']}, "
        f"{f.get('messages', 0)} messages in {f.get('connections', 0)} connections; probes "
        f"{p['answered']}/{p['sent']} answered, p50 {p['latency_ms']['p50']} ms, p99 "
        f"{p['latency_ms']['p99']} ms, max {p['latency_ms']['max']} ms; RSS {m['start']} -> peak "
        f"{m['peak']} -> after {m['after']} kB ({m['after_over_start']}x); "
        f"problems: {'; '.join(r['problems']) or 'none'}"
    )
