"""`fleetpush bench`: every figure measured on loopback in one run.

Layout of a run (all in one temporary workspace, removed at the end):

- the releases are published with ``fleetpush release publish`` (and, with
  ``index``, timed per round into a fresh data dir: the indexing figures);
  the releaser runs as its own process
  (``fleetpush server``), so its CPU (/proc/PID/stat) and peak RSS (VmHWM)
  are its own;
- devices: ``fleetpush update`` processes for the end-to-end figures
  (bench/e2e.py), and :mod:`fleetpush.bench.fleet` workers: one device for
  the download phase alone and one holding ``--devices`` connections for the
  fan-out and the push latency;
- the ceilings and baselines (bench/ceilings.py, bench/baseline.py,
  bench/compare.py) run in the same rounds as the figures they divide
  (bench/rounds.py); the delta scenarios run once, after the rounds
  (bench/delta.py).

Each figure is the median of ``--rounds`` interleaved rounds; each ratio is
the median of its per-round ratios (bench/figures.py).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from fleetpush.demo.processes import Children, peak_rss, raise_nofile
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect
from fleetpush.protocol.hashing import available_algorithms
from fleetpush.protocol.keys import private_key_to_pem, public_bytes

from .baseline import BenchError, make_file, raw_fanout
from .compare import Http, Rsync, missing_tools
from .delta import DeltaContext, run_delta
from .e2e import Device, publish, publish_options
from .figures import Figures, median
from .relay import Relay
from .rounds import RoundContext, declare_ratios, run_round

APP = "bench"
FANOUT_APP = "bench-fanout"
PUSH_TIMEOUT = 30.0
Report = Callable[[str], None]


SCENARIOS = ("download", "e2e", "index", "fanout", "delta")


@attrs.define
class BenchOptions:
    size: int = 1 << 30
    fanout_size: int = 10 << 20
    devices: int = 100
    #: interleaved rounds; every figure is the median over them (min-max beside it)
    repeat: int = 3
    workdir: Path | None = None
    #: which parts run (SCENARIOS)
    scenarios: tuple[str, ...] = SCENARIOS
    #: rsync and nginx->curl+sha256 in the same rounds, where installed
    compare: bool = False
    #: delta scenarios to run (bench/delta.py SIZES) and a size for all of them
    delta: tuple[str, ...] = ("insert", "scattered", "overwrite", "identical")
    delta_size: int | None = None
    #: ``--chunking`` of the download/e2e releases; None: release publish's default
    chunking: str | None = None
    #: chunks outstanding per device: the updater's default for the single
    #: download; fan-out devices share the link, so each keeps a small window.
    window: int = 16
    fanout_window: int = 2
    #: chunk size of the fan-out release: every connection buffers about one
    #: chunk while a frame arrives, so many devices want smaller chunks.
    fanout_chunk_size: int = 256 * 1024
    #: fan-out also with LAN peer delivery, in the same rounds (bench/fanout_p2p.py)
    p2p: bool = False


class Worker:
    """A :mod:`fleetpush.bench.fleet` process and its line protocol."""

    def __init__(self, children: Children, name: str, job: dict[str, Any], workdir: Path) -> None:
        jobfile = workdir / f"{name}.json"
        jobfile.write_text(json.dumps(job))
        self.name = name
        self.child = children.start(
            name,
            [sys.executable, "-m", "fleetpush.bench.fleet", str(jobfile)],
            stdout_pipe=True,
            stdin_pipe=True,
        )

    def _stdin(self) -> IO[bytes]:
        assert self.child.popen.stdin is not None
        return self.child.popen.stdin

    def read(self, timeout: float) -> dict[str, Any]:
        out = self.child.popen.stdout
        assert out is not None
        result: list[bytes] = []

        t = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            raise BenchError(
                f"bench worker {self.name} did not answer within {timeout:.0f}s:\n"
                + self.child.log_tail()
            )
        answer: dict[str, Any] = json.loads(result[0])
        return answer

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        stdin = self._stdin()
        stdin.write(command.encode() + b"\n")
        stdin.flush()
        return self.read(timeout)

    def quit(self) -> None:
        try:
            stdin = self._stdin()
            stdin.write(b"quit\n")
            stdin.close()
            self.child.popen.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.child.stop(2.0)


@contextmanager
def workspace(prefix: str, workdir: str | Path | None) -> Iterator[Path]:
    """A fresh folder for one bench run (under ``workdir``), always removed."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def need_descriptors(devices: int) -> None:
    """Raise the open-files limit for ``devices`` connections. Raises BenchError if too low."""
    nofile = raise_nofile(devices * 2 + 512)
    if nofile < devices + 64:
        raise BenchError(f"RLIMIT_NOFILE is {nofile}: too low for {devices} devices")


def run_bench(opts: BenchOptions, report: Report) -> dict[str, Any]:
    """Run every selected phase; returns the JSON document. Raises :class:`BenchError`."""
    with workspace("fleetpush-bench-", opts.workdir) as root:
        return _run(opts, root, report)


def _publish_all(
    root: Path, key_file: Path, chunking: str | None, report: Report
) -> dict[str, str]:
    """Publish the bench app once per algorithm; returns algorithm -> version.

    Raises BenchError."""
    algorithms = ["sha256"] + (["blake3"] if "blake3" in available_algorithms() else [])
    versions = {algo: f"1.{i}.0" for i, algo in enumerate(algorithms)}
    report("publishing the releases")
    for algo, version in versions.items():
        publish(
            root / "data",
            root / "src" / "single",
            app=APP,
            version=version,
            key=key_file,
            hash_algorithm=algo,
            chunking=chunking,
        )
    return versions


def _default_unfetchable(
    root: Path, key_file: Path, server: str, rel_hex: str, approve: Callable[[str, str], None]
) -> str:
    """Why a device cannot install a release published with ``release publish``'s
    default chunking ("" if it can): a one-file probe release. Raises BenchError
    for anything else than the device's refusal."""
    src = root / "probe-src"
    src.mkdir()
    (src / "probe.txt").write_text("chunking probe\n")
    publish(root / "data", src, app="bench-probe", version="1.0.0", key=key_file)
    approve("bench-probe", "1.0.0")
    device = Device(root / "probe-device", server, "bench-probe", rel_hex, "bench-probe")
    try:
        device.update("1.0.0")
    except BenchError as e:
        return str(e)
    finally:
        shutil.rmtree(root / "probe-device", ignore_errors=True)
    return ""


def _run(opts: BenchOptions, root: Path, report: Report) -> dict[str, Any]:
    want = set(opts.scenarios)
    fan = "fanout" in want
    need_descriptors(opts.devices if fan else 1)
    op_key, rel_key = generate_private_key(), generate_private_key()
    rel_hex = public_bytes(rel_key).hex()
    key_file = root / "release.key"
    key_file.write_bytes(private_key_to_pem(rel_key))
    data_dir, src = root / "data", root / "src"
    report(f"workspace {root}; making a {_mib(opts.size)} and a {_mib(opts.fanout_size)} file")
    (src / "single").mkdir(parents=True)
    (src / "fanout").mkdir(parents=True)
    big = src / "single" / "payload.bin"
    make_file(big, opts.size, seed=1)
    make_file(src / "fanout" / "payload.bin", opts.fanout_size, seed=2)
    figures = Figures()
    chunkings = ("fixed", "cdc") if "--chunking" in publish_options() else ()
    if opts.chunking is not None and not chunkings:
        raise BenchError("--chunking: fleetpush release publish has no --chunking on this build")
    skipped: dict[str, str] = {}
    if not chunkings:
        skipped["index_cdc"] = "fleetpush release publish has no --chunking option"
    algorithms = ["sha256"] + (["blake3"] if "blake3" in available_algorithms() else [])
    fanout_hash = algorithms[-1]
    from fleetpush.server import publish_release

    # The CLI has no chunk-size option: the fan-out release is published in-process.
    publish_release(
        data_dir,
        src / "fanout",
        app=FANOUT_APP,
        version="1.0.0",
        hash_algorithm=fanout_hash,
        chunk_size=opts.fanout_chunk_size,
        signing_keys=[rel_key],
    )
    extra: dict[str, Any] = {}
    limit = str(opts.devices + 64)
    p2p = fan and opts.p2p
    ts_key = generate_private_key()
    p2p_extra: list[str] = []
    if p2p:
        # The releaser is the tracker: it signs peer tokens with a timestamp key.
        (root / "timestamp.key").write_bytes(private_key_to_pem(ts_key))
        p2p_extra = ["--timestamp-key", str(root / "timestamp.key")]
        for run in range(1, opts.repeat + 1):  # a fresh version per round: nobody holds it
            publish_release(
                data_dir,
                src / "fanout",
                app=FANOUT_APP,
                version=f"1.1.{run}",
                hash_algorithm=fanout_hash,
                chunk_size=opts.fanout_chunk_size,
                signing_keys=[rel_key],
            )
    with Children(root / "logs") as children:
        server, host, port = children.start_server(
            data_dir,
            operator_keys=[public_bytes(op_key).hex()],
            insecure=True,  # the bench measures the protocol; scripts/tls_cost.py measures TLS
            release_keys=[rel_hex],
            # Every simulated device dials from 127.0.0.1: one source address
            # stands for a whole fleet, so the per-source handshake cap (a
            # defence against strangers) is lifted to the fleet's size.
            extra=[
                "--max-connections",
                limit,
                "--max-handshaking",
                limit,
                "--max-handshaking-per-source",
                limit,
                *p2p_extra,
            ],
        )
        report(f"releaser pid {server.pid} listening on {host}:{port}")

        def approve(app: str, version: str) -> None:
            async def go() -> None:
                async with connect((host, port), op_key, name="bench") as op:
                    await op.approve(app, version)

            trio.run(go)

        chunking = opts.chunking
        if chunking is None and chunkings:
            why = _default_unfetchable(root, key_file, f"{host}:{port}", rel_hex, approve)
            if why:
                # A build whose releaser cuts content-defined chunks by default
                # before its devices announce chunks-v (specs/PROTOCOL.md §7.3.3):
                # measure the throughput with fixed chunks rather than not at all.
                chunking = "fixed"
                skipped["default_chunking"] = f"{why}; the download/e2e releases use fixed"
        versions = _publish_all(root, key_file, chunking, report)
        for version in versions.values():
            approve(APP, version)
        approve(FANOUT_APP, "1.0.0")
        for run in range(1, opts.repeat + 1 if p2p else 1):
            approve(FANOUT_APP, f"1.1.{run}")
        rsync = http = None
        if opts.compare:
            missing = missing_tools()
            skipped.update({f"compare_{k}": v for k, v in missing.items()})
            rsync = None if "rsync" in missing else Rsync(children, root)
            http = None if "http" in missing else Http(children, root, src / "single")
        else:
            skipped["compare"] = "run with --compare for rsync and nginx->curl+sha256"
        job = {
            "host": host,
            "port": port,
            "app": APP,
            "release_key": rel_hex,
            "window": opts.window,
        }
        single = fleet = None
        if "download" in want:
            single = Worker(
                children,
                "single",
                {**job, "devices": 1, "prefix": "bench-single", "workdir": str(root / "single")},
                root,
            )
            single.read(60)
        if fan:
            report(f"connecting {opts.devices} devices")
            fleet = Worker(
                children,
                "fleet",
                {
                    **job,
                    "app": FANOUT_APP,
                    "devices": opts.devices,
                    "prefix": "bench-fleet",
                    "window": opts.fanout_window,
                    "io_threads": 1,
                    "workdir": str(root / "fleet"),
                },
                root,
            )
            ready = fleet.read(max(60.0, opts.devices * 0.2))
            report(f"{ready['ready']} devices connected")
            if p2p:
                fleet.ask(f"serve_p2p {public_bytes(ts_key).hex()}", 120)
        ctx = RoundContext(
            figures=figures,
            report=report,
            payload=big,
            size=opts.size,
            work=root / "work",
            versions=versions,
            app=APP,
            download=None if single is None else (lambda cmd: single.ask(cmd, 3600)),
            server=f"{host}:{port}",
            server_pid=server.pid,
            release_key_hex=rel_hex,
            e2e="e2e" in want,
            rsync=rsync,
            http=http,
            index_key=key_file if "index" in want else None,
            chunkings=chunkings,
        )
        declare_ratios(figures, algorithms)
        figures.ratio("fanout_vs_raw_fanout", "fanout_bps", "raw_fanout_bps")
        if p2p:
            figures.ratio("fanout_p2p_vs_fanout", "fanout_p2p_bps", "fanout_bps")
            figures.ratio(
                "fanout_p2p_egress_vs_fanout", "fanout_p2p_egress_bytes", "fanout_egress_bytes"
            )
        for run in range(1, opts.repeat + 1):
            report(f"round {run}/{opts.repeat}")
            figures.round = run
            if want & {"download", "e2e", "index"}:
                run_round(ctx, run)
            if fleet is not None:
                _fanout(
                    fleet, figures, src / "fanout" / "payload.bin", root, opts=opts, report=report
                )
                if p2p:
                    _fanout_p2p(fleet, figures, run, opts=opts, report=report)
                lat = _push_latency(fleet, host, port, op_key, opts.devices)
                for name, value in zip(("p50", "p99", "max"), lat, strict=True):
                    figures.add(f"push_latency_{name}_s", value)
                report(
                    f"  push latency       p50 {lat[0] * 1e3:.1f} ms  p99 "
                    f"{lat[1] * 1e3:.1f} ms  max {lat[2] * 1e3:.1f} ms"
                )
        if "delta" in want:
            report("delta scenarios")
            delta = DeltaContext(
                data_dir=data_dir,
                work=root / "delta",
                key_file=key_file,
                release_key_hex=rel_hex,
                server=f"{host}:{port}",
                relay=Relay((host, port)),
                approve=approve,
                report=report,
                chunkings=list(chunkings) or None,
                rsync=rsync,
                size=opts.delta_size,
            )
            with delta.relay:
                extra["delta"] = run_delta(delta, figures, list(opts.delta))
        if single is not None:
            extra["client_peak_rss_bytes"] = single.ask("rss", 30)["rss"]
            single.quit()
        if fleet is not None:
            extra["fanout_client_peak_rss_bytes"] = fleet.ask("rss", 30)["rss"]
            fleet.quit()
        extra["server_peak_rss_bytes"] = peak_rss(server.pid)
    doc = figures.document()
    doc.update(extra)
    doc.update(
        size_bytes=opts.size,
        repeat=opts.repeat,
        rounds=opts.repeat,
        scenarios=sorted(want),
        chunking=chunking or "default",
        algorithms=algorithms,
        skipped=skipped,
    )
    if fan:
        doc.update(
            fanout_p2p=p2p,
            fanout_devices=opts.devices,
            fanout_size_bytes=opts.fanout_size,
            fanout_hash=fanout_hash,
            fanout_chunk_size=opts.fanout_chunk_size,
        )
    for tool in ("rsync", "http"):
        found = {
            k.removesuffix(f"_vs_{tool}"): v
            for k, v in doc["ratios"].items()
            if k.endswith(f"_vs_{tool}")
        }
        if found:
            doc[f"vs_{tool}"] = found
    return doc


def _fanout(
    fleet: Worker,
    figures: Figures,
    payload: Path,
    root: Path,
    *,
    opts: BenchOptions,
    report: Report,
) -> None:
    """The raw many-connection baseline, then the fleet's download of the same size."""
    rate = raw_fanout(payload, opts.devices, root / "work")
    figures.add("raw_fanout_bps", rate)
    report(f"  raw fan-out {opts.devices} x {_mib(opts.fanout_size)} {_rate(rate)}")
    ans = fleet.ask(f"download {FANOUT_APP} 1.0.0", 3600)
    rate = ans["bytes"] / ans["elapsed"]
    figures.add("fanout_bps", rate)
    figures.add("fanout_egress_bytes", ans["bytes"])  # every byte from the releaser
    report(
        f"  fan-out {ans['devices']} x {_mib(opts.fanout_size)} {_rate(rate)} "
        f"({ans['elapsed']:.2f}s)"
    )


def _fanout_p2p(
    fleet: Worker, figures: Figures, run: int, *, opts: BenchOptions, report: Report
) -> None:
    """The same fan-out with LAN peer delivery (doubling waves), right after it."""
    ans = fleet.ask(f"download_p2p {FANOUT_APP} 1.1.{run}", 3600)
    rate = ans["bytes"] / ans["elapsed"]
    figures.add("fanout_p2p_bps", rate)
    # Chunk bytes the releaser sent (the devices' count of what they fetched
    # from it); manifests and control messages are not in it, in either mode.
    figures.add("fanout_p2p_egress_bytes", ans["from_releaser"])
    figures.add("fanout_p2p_peer_bytes", ans["from_peers"])
    report(
        f"  fan-out p2p {ans['devices']} x {_mib(opts.fanout_size)} {_rate(rate)} "
        f"({ans['elapsed']:.2f}s; releaser sent {_mib(ans['from_releaser'])}, peers "
        f"{_mib(ans['from_peers'])})"
    )


def _push_latency(
    fleet: Worker, host: str, port: int, key: Any, devices: int
) -> tuple[float, float, float]:
    fleet.ask("arm", 30)

    async def push() -> float:
        async with connect((host, port), key, name="bench") as op:
            t0 = time.monotonic()
            result = await op.push(app=FANOUT_APP, version="1.0.0", mode="force", all=True)
            if len(result.sent) < devices:
                raise BenchError(
                    f"push reached {len(result.sent)} of {devices} connected devices "
                    f"({len(result.queued)} queued)"
                )
            return t0

    t0 = trio.run(push)
    times = fleet.ask(f"collect {PUSH_TIMEOUT}", PUSH_TIMEOUT + 30)["times"]
    if len(times) < devices:
        raise BenchError(f"only {len(times)} of {devices} devices got __force_update__")
    lat = sorted(t - t0 for t in times)
    p99 = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]  # nearest rank
    return median(lat), p99, lat[-1]


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.1f} GiB"


def _rate(bps: float) -> str:
    return f"{bps / 1e6:8.1f} MB/s"
