"""How long a device's apply takes: ``apply_staged`` of a large staged release.

    python scripts/apply_bench.py [--size-mib 1024] [--files 4] [--runs 5] [--dir DIR]

A release of ``--files`` files totalling ``--size-mib`` MiB is staged in a
temporary state directory under ``--dir`` (default: the system temp dir) as
the downloader leaves it: each file written and fsynced in
``updates/<version>/files/``, the manifest made by the real publisher
(``build_manifest``, signed with a throwaway key), ``mark_staged`` with
``verify=False`` (the downloader verified every chunk). Version 1 is applied
untimed; then each run stages the next version (every file different, same
paths and sizes) and times ``apply_staged`` of it: the backup of the old
files, the install of the new ones, the commit. The update directory is
dropped after each apply (``trial.confirm``), as on a device.

Printed: one JSON object: median and min-max seconds of the apply, and of
the time spent in ``os.fsync`` within it (the share that depends on the
disk, not on the code). Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.client.install import apply_staged, mark_staged
from fleetpush.client.layout import StateLayout
from fleetpush.client.trial import confirm
from fleetpush.protocol import codec
from fleetpush.protocol.manifest import sign_manifest
from fleetpush.server.publish import build_manifest

BLOCK = 1024 * 1024


def stage(state: Path, version: int, *, files: int, size: int, key: Ed25519PrivateKey) -> None:
    """Stage release ``version`` as the downloader leaves it (module docstring)."""
    layout = StateLayout.of(state)
    staged = layout.staged_files(f"{version}.0")
    staged.mkdir(parents=True)
    block = os.urandom(BLOCK)
    per_file = size // files
    for i in range(files):
        path = staged / f"data/part-{i}.bin"
        path.parent.mkdir(exist_ok=True)
        with path.open("wb") as f:
            # Each file of each version differs from the first bytes on.
            f.write(f"v{version} f{i} ".encode().ljust(64, b"."))
            left = per_file - 64
            while left > 0:
                left -= f.write(block[: min(left, BLOCK)])
            f.flush()
            os.fsync(f.fileno())
    manifest = build_manifest(staged, app="bench", version=f"{version}.0", sequence=version)
    signed = sign_manifest(manifest.to_bytes(), [key])
    layout.staged_manifest(f"{version}.0").write_bytes(codec.packb(codec.to_wire(signed)))
    mark_staged(state, f"{version}.0", verify=False)


@contextmanager
def fsync_timer() -> Iterator[list[float]]:
    """Sum the seconds spent in ``os.fsync`` while the block runs."""
    spent = [0.0]
    real = os.fsync

    def timed(fd: int) -> None:
        t0 = time.perf_counter()
        try:
            real(fd)
        finally:
            spent[0] += time.perf_counter() - t0

    os.fsync = timed
    try:
        yield spent
    finally:
        os.fsync = real


def figures(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4),
            "max": round(max(xs), 4)}


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    state, root = work / "state", work / "app"
    key = Ed25519PrivateKey.generate()
    size = args.size_mib * BLOCK
    now: Callable[[], float] = time.time
    stage(state, 1, files=args.files, size=size, key=key)
    apply_staged(state, root, "1.0", now())
    confirm(state, now())
    applies, fsyncs = [], []
    for n in range(2, args.runs + 2):
        stage(state, n, files=args.files, size=size, key=key)
        with fsync_timer() as spent:
            t0 = time.perf_counter()
            apply_staged(state, root, f"{n}.0", now())
            applies.append(time.perf_counter() - t0)
        fsyncs.append(spent[0])
        confirm(state, now())
    return {
        "bench": "apply",
        "size_mib": args.size_mib,
        "files": args.files,
        "runs": args.runs,
        "apply_s": figures(applies),
        "fsync_s": figures(fsyncs),
        "apply_without_fsync_s": figures([a - f for a, f in zip(applies, fsyncs, strict=True)]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="release size (MiB)")
    parser.add_argument("--files", type=int, default=4, help="files in the release")
    parser.add_argument("--runs", type=int, default=5, help="timed applies")
    parser.add_argument("--dir", type=Path, default=None, help="where to work (a filesystem)")
    args = parser.parse_args()
    if args.files < 1 or args.runs < 1 or args.size_mib * BLOCK < 64 * args.files:
        parser.error("--files and --runs must be >= 1, and each file at least 64 bytes")
    with tempfile.TemporaryDirectory(prefix="fp-apply-bench-", dir=args.dir) as tmp:
        print(json.dumps(run(args, Path(tmp))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
