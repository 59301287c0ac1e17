"""One interleaved round of the single-device figures (issue 14, item 5).

In each round, in this order, so every ratio divides figures of the same
round (bench/figures.py):

0. with ``index``: ``fleetpush release publish`` of the payload into a
   fresh data dir, per algorithm (and ``--chunking``): the indexing time;
1. the ceilings (bench/ceilings.py): network into /dev/null, hash rates;
2. per algorithm: the disk-write rate into the download's destination
   folder *right before* the download phase alone (a bench worker running
   the updater's download module, ``single_<algo>_bps``), then the same
   for the end-to-end update (``fleetpush update`` as a process,
   ``e2e_<algo>_*``), each with its ``ceiling = min(network, disk, hash)``;
3. with ``--compare``: rsync+fsync and nginx->curl+sha256 of the same file.

Everything the round needs comes in a :class:`RoundContext`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .ceilings import disk_write_rate, hash_rate, network_rate
from .compare import Http, Rsync
from .e2e import Device, proc_cpu, publish
from .figures import Figures

GIB = 1 << 30


@attrs.define
class RoundContext:
    figures: Figures
    report: Callable[[str], None]
    #: the release file (the same bytes every algorithm's release holds)
    payload: Path
    size: int
    #: where downloads, devices and comparisons write (one filesystem)
    work: Path
    #: algorithm -> version of the bench app holding ``payload`` with it
    versions: dict[str, str]
    app: str
    #: "download APP VERSION" to the single-device bench worker: its answer
    download: Callable[[str], dict[str, Any]] | None
    #: the releaser's HOST:PORT and pid (its CPU time is read from /proc)
    server: str
    server_pid: int
    release_key_hex: str
    e2e: bool = True
    rsync: Rsync | None = None
    http: Http | None = None
    #: with a release key file: time ``fleetpush release publish`` of the payload
    #: per algorithm (and per ``--chunking`` of ``chunkings``) into a fresh data dir
    index_key: Path | None = None
    chunkings: tuple[str, ...] = ()


def run_round(ctx: RoundContext, number: int) -> None:
    """Measure one round into ``ctx.figures``. Raises BenchError."""
    f, say = ctx.figures, ctx.report
    if ctx.index_key is not None:
        _index(ctx, number)
    if ctx.download is None and not ctx.e2e:
        return
    net = network_rate(ctx.payload)
    f.add("net_bps", net)
    say(f"  network -> /dev/null   {_rate(net)}")
    for algo in ctx.versions:
        rate = hash_rate(ctx.size, algorithm=algo)
        f.add(f"hash_{algo}_bps", rate)
        say(f"  {algo} hashing        {_rate(rate)}")
    for algo, version in ctx.versions.items():
        if ctx.download is not None:
            dest = ctx.work / "single"
            _disk(ctx, f"single_{algo}", dest)
            ans = ctx.download(f"download {ctx.app} {version}")
            f.add(f"single_{algo}_bps", ans["bytes"] / ans["elapsed"])
            _vs_ceiling(ctx, f"single_{algo}", f.last(f"single_{algo}_bps"))
        if ctx.e2e:
            _e2e(ctx, algo, version, number)
    if ctx.rsync is not None:
        dest = ctx.work / f"rsync-{number}"
        t = ctx.rsync.pull(ctx.payload.parent, dest)
        shutil.rmtree(dest, ignore_errors=True)
        f.add("rsync_fsync_s", t.seconds)
        f.add("rsync_fsync_bps", ctx.size / t.seconds)
        say(f"  rsync + fsync          {_rate(ctx.size / t.seconds)}")
    if ctx.http is not None:
        dest = ctx.work / f"http-{number}"
        t = ctx.http.fetch(ctx.payload.name, dest, ctx.size)
        shutil.rmtree(dest, ignore_errors=True)
        f.add("http_sha256_s", t.seconds)
        f.add("http_sha256_bps", ctx.size / t.seconds)
        say(f"  nginx->curl+sha256     {_rate(ctx.size / t.seconds)}")


def declare_ratios(f: Figures, algorithms: list[str]) -> None:
    """The ratios of the round's figures (each taken round by round)."""
    for algo in algorithms:
        for phase in (f"single_{algo}", f"e2e_{algo}"):
            f.ratio(f"{phase}_vs_ceiling", f"{phase}_bps", f"{phase}_ceiling_bps")
            f.ratio(f"{phase}_vs_disk", f"{phase}_bps", f"{phase}_disk_bps")
            f.ratio(f"{phase}_vs_net", f"{phase}_bps", "net_bps")
        f.ratio(f"single_{algo}_vs_hash", f"single_{algo}_bps", f"hash_{algo}_bps")
        # end to end against the tools, as throughput ratios: above 1 is faster
        f.ratio(f"e2e_{algo}_vs_rsync", f"e2e_{algo}_bps", "rsync_fsync_bps")
        f.ratio(f"e2e_{algo}_vs_http", f"e2e_{algo}_bps", "http_sha256_bps")


def _index(ctx: RoundContext, number: int) -> None:
    """Indexing time at publish: the CLI publishing the payload into a fresh data dir."""
    assert ctx.index_key is not None
    gib = ctx.size / GIB
    for algo in ctx.versions:
        for chunking in (None, *ctx.chunkings):
            data_dir = ctx.work / f"index-{number}"
            try:
                seconds = publish(
                    data_dir,
                    ctx.payload.parent,
                    app="bench-index",
                    version="1.0.0",
                    key=ctx.index_key,
                    hash_algorithm=algo,
                    chunking=chunking,
                )
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
            name = f"index_{algo}" if chunking is None else f"index_{chunking}_{algo}"
            ctx.figures.add(f"{name}_s", seconds)
            ctx.figures.add(f"{name}_s_per_gib", seconds / gib)
            ctx.report(f"  {name:<20}   {seconds:.2f} s")


def _disk(ctx: RoundContext, phase: str, dest: Path) -> None:
    rate = disk_write_rate(dest, ctx.size)
    ctx.figures.add(f"{phase}_disk_bps", rate)


def _vs_ceiling(ctx: RoundContext, phase: str, rate: float) -> None:
    f = ctx.figures
    algo = phase.rsplit("_", 1)[1]
    ceiling = min(f.last("net_bps"), f.last(f"{phase}_disk_bps"), f.last(f"hash_{algo}_bps"))
    f.add(f"{phase}_ceiling_bps", ceiling)
    ctx.report(
        f"  {phase:<20}   {_rate(rate)}  ({rate / ceiling:.2f} x ceiling {_rate(ceiling).strip()},"
        f" disk {_rate(f.last(f'{phase}_disk_bps')).strip()})"
    )


def _e2e(ctx: RoundContext, algo: str, version: str, number: int) -> None:
    f = ctx.figures
    phase = f"e2e_{algo}"
    root = ctx.work / f"e2e-{number}-{algo}"
    device = Device(root, ctx.server, ctx.app, ctx.release_key_hex, f"bench-e2e-{number}-{algo}")
    device.write_config()
    _disk(ctx, phase, root / "app-probe")
    cpu0 = proc_cpu(ctx.server_pid)
    run = device.update(version)
    server_cpu = proc_cpu(ctx.server_pid) - cpu0
    shutil.rmtree(root, ignore_errors=True)
    gib = ctx.size / GIB
    f.add(f"{phase}_s", run.seconds)
    f.add(f"{phase}_bps", ctx.size / run.seconds)
    f.add(f"{phase}_device_cpu_s_per_gib", run.cpu_s / gib)
    f.add(f"{phase}_releaser_cpu_s_per_gib", server_cpu / gib)
    f.add(f"{phase}_device_peak_rss_bytes", run.peak_rss)
    _vs_ceiling(ctx, phase, ctx.size / run.seconds)


def _rate(bps: float) -> str:
    return f"{bps / 1e6:8.1f} MB/s"
