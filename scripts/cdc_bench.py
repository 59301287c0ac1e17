"""What content-defined chunks save, and what indexing a release costs (issue 14, item 4).

    python scripts/cdc_bench.py [--index-size 1GiB] [--hash sha256] [--workdir DIR]

Every figure comes from the real publisher (``build_manifest``, which reads,
cuts and hashes each file once) on real files of random bytes:

* **index**: seconds to build the manifest of a ``--index-size`` release
  (FastCDC + hashing; the target is <= 5 s for 1 GiB), with fixed 1 MiB
  chunks for comparison (hashing only), and what ``--compress`` adds;
* **3 x 4 KiB into 256 MiB**, **20 x 4 KiB into 64 MiB**, **identical
  re-publish**: the bytes a device fetches to go from the old release to the
  new, for cdc and for fixed chunks. A device reuses every chunk whose digest
  it already holds (its seed map, specs/PROTOCOL.md §7.3.3) and fetches the
  others, so the figure is: the signed manifest, plus each missing chunk with
  its 20-byte DATA header, plus one ``get_chunks`` request (~40 bytes + 10
  per chunk) per 64 chunks. That is computed from the two manifests, not
  counted on a socket: the device side that fetches by digest is another
  branch's work (client/download.py).

Printed as a table, and ``--json PATH`` writes the figures. Not a test:
nothing asserts; the targets are printed next to the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetpush.protocol import Manifest, sign_manifest
from fleetpush.protocol.keys import private_key_from_seed
from fleetpush.protocol.limits import MAX_CHUNKS_PER_REQUEST
from fleetpush.server import build_manifest
from fleetpush.server.chunking import CdcCut, index_file

MiB = 1 << 20
KEY = private_key_from_seed(bytes(32))


def _write_noise(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 16 * MiB)
            out.write(rng.randbytes(n))
            left -= n


def _insert(src: Path, dst: Path, count: int, seed: int) -> None:
    """``src`` with ``count`` 4 KiB runs of new bytes inserted at spread-out offsets."""
    data = bytearray(src.read_bytes())
    rng = random.Random(seed)
    offsets = sorted((rng.randrange(len(data)) for _ in range(count)), reverse=True)
    for offset in offsets:
        data[offset:offset] = rng.randbytes(4096)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)


def _manifest(tree: Path, chunking: str, algorithm: str) -> Manifest:
    return build_manifest(
        tree, app="bench", version="1.0", sequence=1, chunking=chunking, hash_algorithm=algorithm
    )


def fetched_bytes(old: Manifest, new: Manifest) -> dict[str, int]:
    """What a device holding ``old`` fetches to stage ``new`` (see the module docstring)."""
    have = {d for f in old.files for d in f.chunks}
    missing = 0
    payload = 0
    asked: set[bytes] = set()
    for f in new.files:
        for i, digest in enumerate(f.chunks):
            if digest in have or digest in asked:
                continue
            asked.add(digest)
            missing += 1
            payload += f.chunk_span(new.chunk_size, i)[1]
    signed = sign_manifest(new.to_bytes(), [KEY])
    manifest = len(signed.signed) + 64 + 100  # one signature, envelope and headers
    requests = -(-missing // MAX_CHUNKS_PER_REQUEST)
    wire = manifest + payload + 20 * missing + requests * 40 + 10 * missing
    return {"chunks": missing, "payload": payload, "manifest": manifest, "wire": wire}


def _scenario(work: Path, name: str, size: int, inserts: int, algorithm: str) -> dict[str, Any]:
    old_tree, new_tree = work / f"{name}-old", work / f"{name}-new"
    _write_noise(old_tree / "big.bin", size, seed=size)
    if inserts:
        _insert(old_tree / "big.bin", new_tree / "big.bin", inserts, seed=inserts)
    else:
        new_tree.mkdir(parents=True, exist_ok=True)
        os.link(old_tree / "big.bin", new_tree / "big.bin")
    out: dict[str, Any] = {"size": size, "inserts": inserts}
    for chunking in ("cdc", "fixed"):
        old = _manifest(old_tree, chunking, algorithm)
        new = _manifest(new_tree, chunking, algorithm)
        got = fetched_bytes(old, new)
        got["share"] = got["wire"] / new.total_size
        out[chunking] = got
    for tree in (old_tree, new_tree):
        (tree / "big.bin").unlink()
    return out


def _index(work: Path, size: int, algorithm: str) -> dict[str, float]:
    tree = work / "index"
    _write_noise(tree / "release.bin", size, seed=7)
    out: dict[str, float] = {"size": size}
    # The machine is shared: the CPU seconds of this process say what indexing
    # costs, the wall seconds what it took under the load of the moment, and
    # the sha256 rate how fast this machine was just then (two passes of it
    # are most of the cost: chunk digests and the whole-file digest).
    block = random.Random(1).randbytes(64 * MiB)
    start = time.perf_counter()
    hashlib.sha256(block).digest()
    out["sha256_MBps"] = round(len(block) / (time.perf_counter() - start) / 1e6)
    for chunking in ("cdc", "fixed"):
        best, cpu = float("inf"), float("inf")
        for _ in range(2):  # the second run reads from the page cache, as the first may not
            start, start_cpu = time.perf_counter(), time.process_time()
            m = _manifest(tree, chunking, algorithm)
            best = min(best, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        out[f"{chunking}_seconds"] = round(best, 3)
        out[f"{chunking}_cpu_seconds"] = round(cpu, 3)
        out[f"{chunking}_chunks"] = m.total_chunks
    # What --compress adds (zstd on every chunk; noise does not compress, so
    # every frame is made and dropped: the worst case for its cost).
    start, start_cpu = time.perf_counter(), time.process_time()
    index_file(tree / "release.bin", "release.bin", CdcCut(), algorithm, compress=True)
    out["cdc_zstd_seconds"] = round(time.perf_counter() - start, 3)
    out["cdc_zstd_cpu_seconds"] = round(time.process_time() - start_cpu, 3)
    (tree / "release.bin").unlink()
    return out


def main() -> None:
    from fleetpush.cli.bench_cmd import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index-size", type=parse_size, default=1 << 30)
    ap.add_argument("--hash", default="sha256", choices=["sha256", "blake3"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetpush-cdc-", dir=args.workdir) as tmp:
        work = Path(tmp)
        doc = {
            "hash": args.hash,
            "index": _index(work, args.index_size, args.hash),
            "insert_3_into_256MiB": _scenario(work, "a", 256 * MiB, 3, args.hash),
            "insert_20_into_64MiB": _scenario(work, "b", 64 * MiB, 20, args.hash),
            "identical_64MiB": _scenario(work, "c", 64 * MiB, 0, args.hash),
        }
    ix = doc["index"]
    print(
        f"index {ix['size'] / MiB:.0f} MiB ({args.hash}): cdc {ix['cdc_seconds']} s wall, "
        f"{ix['cdc_cpu_seconds']} s CPU ({ix['cdc_chunks']} chunks); fixed "
        f"{ix['fixed_seconds']} s wall, {ix['fixed_cpu_seconds']} s CPU; machine sha256 "
        f"{ix['sha256_MBps']} MB/s   [target cdc <= 5 s/GiB]; with --compress "
        f"{ix['cdc_zstd_seconds']} s wall, {ix['cdc_zstd_cpu_seconds']} s CPU"
    )
    targets = {
        "insert_3_into_256MiB": "<= 1 MB",
        "insert_20_into_64MiB": "<= 6%",
        "identical_64MiB": "manifest only",
    }
    for name, target in targets.items():
        row = doc[name]
        cdc, fixed = row["cdc"], row["fixed"]
        print(
            f"{name}: cdc {cdc['wire'] / 1e6:.3f} MB ({100 * cdc['share']:.2f}%, "
            f"{cdc['chunks']} chunks, manifest {cdc['manifest']} B); fixed "
            f"{fixed['wire'] / 1e6:.1f} MB ({100 * fixed['share']:.1f}%)   [target {target}]"
        )
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
