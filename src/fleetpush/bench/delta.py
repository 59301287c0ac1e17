"""Delta scenarios (issue 14): what a small change costs on the wire.

Each scenario publishes version 1 of a file, installs it on a fresh device
(``fleetpush update``, not counted), changes the file, publishes version 2
and updates the device again through :class:`~fleetpush.bench.relay.Relay`,
which counts the bytes the releaser sends (frame headers and manifest
included). Scenarios, at their issue sizes unless ``size`` overrides them:

- ``insert``: one 256 MiB file with 3 x 4 KiB insertions;
- ``scattered``: 20 insertions of 1 KiB scattered over 64 MiB (bytes as % of
  the file);
- ``overwrite``: 1% of 1 GiB overwritten in 16 places; also timed, and
  compared with rsync's delta transfer of the same change (``--stats``);
- ``identical``: version 2 has the same bytes (a re-publish): only the
  manifest should cross.

Each runs once per chunking the releaser offers: ``--chunking fixed`` and
``cdc`` where ``fleetpush release publish`` has that option, else the
default chunking only, with ``cdc`` reported as skipped.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .baseline import BenchError, make_file
from .compare import Rsync
from .e2e import Device, publish
from .figures import Figures
from .relay import Relay

MIB = 1 << 20
#: scenario -> its file size at the issue's scale
SIZES = {"insert": 256 * MIB, "scattered": 64 * MIB, "overwrite": 1024 * MIB, "identical": 64 * MIB}


@attrs.define
class DeltaContext:
    data_dir: Path
    work: Path
    key_file: Path
    release_key_hex: str
    #: the releaser's HOST:PORT
    server: str
    relay: Relay
    #: (app, version) -> approved on the releaser
    approve: Callable[[str, str], None]
    report: Callable[[str], None]
    #: None: ``--chunking`` is not an option of release publish on this build
    chunkings: list[str] | None
    rsync: Rsync | None = None
    #: a size for every scenario instead of the issue's (quick runs)
    size: int | None = None


def mutate(kind: str, src: Path, dst: Path, seed: int) -> None:
    """Write ``src`` changed as scenario ``kind`` says into ``dst``."""
    size = src.stat().st_size
    rng = random.Random(seed)
    if kind == "identical":
        shutil.copyfile(src, dst)
    elif kind == "overwrite":
        shutil.copyfile(src, dst)
        region = max(1, size // 100 // 16)
        with dst.open("r+b") as f:
            for off in sorted(rng.randrange(0, size - region) for _ in range(16)):
                f.seek(off)
                f.write(rng.randbytes(region))
    else:
        count, length = (3, 4096) if kind == "insert" else (20, 1024)
        offsets = sorted(rng.randrange(0, size) for _ in range(count))
        with src.open("rb") as i, dst.open("wb") as o:
            pos = 0
            for off in [*offsets, size]:
                left = off - pos
                while left > 0:
                    block = i.read(min(left, 4 * MIB))
                    o.write(block)
                    left -= len(block)
                pos = off
                if off < size:
                    o.write(rng.randbytes(length))


def run_delta(ctx: DeltaContext, figures: Figures, scenarios: list[str]) -> dict[str, Any]:
    """Every scenario under every chunking; figures go into ``figures``.

    Returns ``{"wire_bytes_source": ..., "skipped": {...}}``. Raises BenchError."""
    skipped: dict[str, str] = {}
    chunkings: list[str | None] = list(ctx.chunkings) if ctx.chunkings is not None else [None]
    if ctx.chunkings is None:
        skipped["cdc"] = "fleetpush release publish has no --chunking option on this build"
    for kind in scenarios:
        for chunking in chunkings:
            if chunking in skipped:
                continue
            try:
                _scenario(ctx, figures, kind, chunking)
            except BenchError as e:
                if chunking != "cdc":
                    raise
                # The releaser can cut content-defined chunks before the
                # device can fetch them (specs/PROTOCOL.md §7.3.3: it must
                # announce chunks-v); that is this build's state, not a bench failure.
                skipped["cdc"] = str(e)
                ctx.report(f"  delta cdc skipped: {e}")
    return {
        "wire_bytes_source": "bench relay between releaser and device: TCP payload bytes "
        "releaser->device (handshake, frame headers, manifest and chunks)",
        "skipped": skipped,
        "chunkings": [c or "default" for c in chunkings],
    }


def _scenario(ctx: DeltaContext, figures: Figures, kind: str, chunking: str | None) -> None:
    label = chunking or "default"
    app = f"delta-{kind}-{label}"
    size = ctx.size or SIZES[kind]
    base = ctx.work / app
    try:
        _measure(ctx, figures, kind=kind, chunking=chunking, app=app, size=size, base=base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _measure(
    ctx: DeltaContext,
    figures: Figures,
    *,
    kind: str,
    chunking: str | None,
    app: str,
    size: int,
    base: Path,
) -> None:
    label = chunking or "default"
    v1, v2 = base / "v1", base / "v2"
    v1.mkdir(parents=True)
    v2.mkdir()
    make_file(v1 / "payload.bin", size, seed=list(SIZES).index(kind) + 10)
    mutate(kind, v1 / "payload.bin", v2 / "payload.bin", seed=7)
    new_size = (v2 / "payload.bin").stat().st_size
    for version, folder in (("1.0.0", v1), ("2.0.0", v2)):
        publish(
            ctx.data_dir,
            folder,
            app=app,
            version=version,
            key=ctx.key_file,
            chunking=chunking,
        )
        ctx.approve(app, version)
    device = Device(base / "device", ctx.server, app, ctx.release_key_hex, f"bench-{app}")
    device.update("1.0.0")
    device.server = f"127.0.0.1:{ctx.relay.port}"
    ctx.relay.reset()
    run = device.update("2.0.0")
    down, _up = ctx.relay.counts()
    if down == 0:
        raise BenchError(f"delta {kind}: the relay saw no bytes: did the device bypass it?")
    name = f"delta_{kind}_{label}"
    figures.add(f"{name}_wire_bytes", down)
    figures.add(f"{name}_wire_pct", 100.0 * down / new_size)
    figures.add(f"{name}_s", run.seconds)
    ctx.report(
        f"  delta {kind:<9} {label:<7} {down:>12,} bytes on the wire "
        f"({100.0 * down / new_size:.2f}% of {new_size:,}) in {run.seconds:.2f}s"
    )
    if kind == "overwrite" and ctx.rsync is not None:
        dest = base / "rsync"
        ctx.rsync.pull(v1, dest)
        # rsync's delta transfer: the v1 copy in dest is its basis
        t = ctx.rsync.pull(v2, dest, delta=True)
        figures.add("delta_overwrite_rsync_bytes", t.received)
        figures.add("delta_overwrite_rsync_s", t.seconds)
        # bytes: fleetpush / rsync (below 1: fewer bytes than rsync);
        # time: rsync's seconds / fleetpush's (above 1: faster than rsync)
        figures.ratio(f"{name}_bytes_vs_rsync", f"{name}_wire_bytes", "delta_overwrite_rsync_bytes")
        figures.ratio(
            f"{name}_speed_vs_rsync", f"{name}_s", "delta_overwrite_rsync_s", durations=True
        )
        ctx.report(f"  delta overwrite rsync   {t.received:>12,} bytes in {t.seconds:.2f}s")
    os.sync()
