"""Memory dumps of a running ``fleetpush server`` on SIGUSR1 (diagnosis, not shipped).

How the live fuzz campaign's RSS was taken apart (specs/THREATS.md, issue 10).
Put this directory on ``PYTHONPATH`` and name an output directory::

    FLEETPUSH_MEMDUMP=/tmp/dumps PYTHONPATH=scripts/memdump fleetpush server ...
    kill -USR1 <pid>      # once at the start, once after the load; then compare

Python imports ``sitecustomize`` at start-up; this one acts only in a process
whose command line contains ``server`` (not in the fuzzer's workers). Each
signal writes ``infoNN.json``: RSS, resident kB per kind of mapping
(``[heap]`` is glibc's main heap, ``anon`` holds CPython's 1 MiB arenas),
``sqlite3_memory_used()``; and ``mallocNN.txt``: ``sys._debugmallocstats()``
(arenas allocated, high-water mark, empty pools) and glibc's ``malloc_stats()``.

``FLEETPUSH_MEMDUMP_TRACE=N`` also runs tracemalloc (N frames) and dumps
``snapNN.tm`` for ``Snapshot.load(...).compare_to(...)``. It slows the
releaser several times over, its own bookkeeping shows up in the heap, and
CPython then prints no arena statistics (its allocator is hooked).

``FLEETPUSH_MEMDUMP_ARENAS=1`` adds ``arenasNN.json`` from the second signal
on: for each CPython arena, the pools in use and the types of the live
objects in it (found through ``gc``; reads the pool headers of CPython
3.11's obmalloc). Never at the first signal: the census allocates a peak of
its own that would then be pinned like any other.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

POOL_SIZE = 16 * 1024  # CPython 3.11 obmalloc, 64-bit
POOL_HEADER = 48  # bytes of struct pool_header before the first block


def _sqlite_memory_used() -> int | None:
    try:
        lib = ctypes.CDLL("libsqlite3.so.0")
    except OSError:
        return None
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


def _rss_kb() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _smaps() -> dict[str, list[int]]:
    """Resident kB and mapping count per kind: file name, [heap], anon 1 MiB, anon other."""
    kinds: dict[str, list[int]] = {}
    current: list[int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                if not name:
                    name = "anon-1MiB" if hi - lo == 1 << 20 else "anon-other"
                current = kinds.setdefault(os.path.basename(name), [0, 0])
                current[1] += 1
            elif parts[0] == "Rss:" and current is not None:
                current[0] += int(parts[1])
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1][0]))


def _writable_ranges() -> tuple[list[int], list[tuple[int, int]]]:
    ranges: list[tuple[int, int]] = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[1].startswith("rw"):  # anonymous, writable
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    ranges.sort()
    return [lo for lo, _ in ranges], ranges


def arena_census(path: Path) -> None:
    """Which live objects sit in which CPython arena (see the module docstring)."""
    gc.unfreeze()  # frozen objects are invisible to gc.get_objects()
    gc.collect()
    objects: dict[int, object] = {id(o): o for o in gc.get_objects()}
    for o in list(objects.values()):
        for r in gc.get_referents(o):  # untracked ones too: str, int, float...
            objects.setdefault(id(r), r)
    starts, ranges = _writable_ranges()
    pools: dict[int, tuple[int, int, int] | None] = {}
    types: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for addr, o in objects.items():
        start = addr - (16 if gc.is_tracked(o) else 0)  # the GC header comes first
        base = start & ~(POOL_SIZE - 1)
        if base not in pools:
            i = bisect.bisect_right(starts, base) - 1
            if i < 0 or not ranges[i][0] <= base <= ranges[i][1] - POOL_HEADER:
                pools[base] = None  # static objects, or not in an anonymous mapping
                continue
            raw = ctypes.string_at(base, POOL_HEADER)
            count = int.from_bytes(raw[0:4], "little")
            arena = int.from_bytes(raw[32:36], "little")
            szidx = int.from_bytes(raw[36:40], "little")
            pools[base] = (count, arena, szidx)
        pool = pools[base]
        if pool is None:
            continue
        count, arena, szidx = pool
        block = (szidx + 1) * 16
        if szidx > 31 or (start - base - POOL_HEADER) % block:
            continue  # not a block of an obmalloc pool (a malloc'd object)
        types[arena][type(o).__name__] += 1
    arenas: dict[int, dict[str, Any]] = {}
    for pool in pools.values():
        if pool is None or pool[2] > 31:
            continue
        entry = arenas.setdefault(pool[1], {"pools_in_use": 0, "blocks": 0})
        entry["pools_in_use"] += 1
        entry["blocks"] += pool[0]
    report = [{"arena": a, **arenas[a], "types": types[a].most_common(12)} for a in sorted(arenas)]
    gc.freeze()
    path.write_text(json.dumps(report, indent=1))


def _install(out: Path) -> None:
    trace = int(os.environ.get("FLEETPUSH_MEMDUMP_TRACE", "0"))
    census = bool(os.environ.get("FLEETPUSH_MEMDUMP_ARENAS"))
    if trace:
        import tracemalloc

        tracemalloc.start(trace)
    out.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None)
    dumps = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal dumps
        dumps += 1
        tag = f"{dumps:02d}"
        info: dict[str, Any] = {
            "time": time.time(),
            "rss_kb": _rss_kb(),
            "sqlite_memory_used": _sqlite_memory_used(),
            "smaps_rss_kb": _smaps(),
        }
        if trace:
            import tracemalloc

            tracemalloc.take_snapshot().dump(str(out / f"snap{tag}.tm"))
            info["traced"] = tracemalloc.get_traced_memory()
        fd = os.open(out / f"malloc{tag}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        saved = os.dup(2)
        os.dup2(fd, 2)  # both write to stderr
        try:
            sys._debugmallocstats()
            sys.stderr.flush()
            libc.malloc_stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
        (out / f"info{tag}.json").write_text(json.dumps(info, indent=1))
        if census and dumps > 1:
            arena_census(out / f"arenas{tag}.json")

    signal.signal(signal.SIGUSR1, dump)


if os.environ.get("FLEETPUSH_MEMDUMP") and "server" in sys.orig_argv:
    _install(Path(os.environ["FLEETPUSH_MEMDUMP"]))
