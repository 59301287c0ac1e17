"""Helpers for the install-engine tests: build signed releases, stage them, snapshot trees."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import attrs
from fleetpush.client.install import mark_staged
from fleetpush.client.layout import StateLayout
from fleetpush.client.state import StagedInfo, load_state, save_state
from fleetpush.protocol import codec
from fleetpush.protocol.limits import MIN_CHUNK_SIZE
from fleetpush.protocol.manifest import FileEntry, Manifest, PythonEnv, sign_manifest
from fp_keys import RELEASE_KEY

APP = "demo"

Files = dict[str, tuple[bytes, int]]

V1: Files = {
    "bin/app": (b"#!/bin/sh\necho v1\n", 0o755),
    "lib/core.py": (b"core = 1\n", 0o644),
    "lib/old.py": (b"old = 1\n", 0o644),
    "olddir/only.txt": (b"only in v1\n", 0o644),
    "data/keep.txt": (b"same in both\n" * 500, 0o644),
    "data/mode.txt": (b"mode changes\n", 0o644),
    "conf/secret.cfg": (b"k=v\n", 0o600),
}

V2: Files = {
    "bin/app": (b"#!/bin/sh\necho v2, longer than before\n", 0o755),
    "lib/core.py": (b"core = 2\n" * 3000, 0o644),  # several chunks
    "lib/new.py": (b"new = 2\n", 0o644),
    "newdir/sub/n.txt": (b"brand new\n", 0o755),
    "data/keep.txt": (b"same in both\n" * 500, 0o644),
    "data/mode.txt": (b"mode changes\n", 0o755),
    "conf/secret.cfg": (b"k=v2\n", 0o600),
}


def manifest_for(version: str, sequence: int, files: Files) -> Manifest:
    cs = MIN_CHUNK_SIZE
    entries = [
        FileEntry(
            path=path,
            size=len(data),
            mode=mode,
            digest=hashlib.sha256(data).digest(),
            chunks=[hashlib.sha256(data[i : i + cs]).digest() for i in range(0, len(data), cs)],
        )
        for path, (data, mode) in sorted(files.items())
    ]
    return Manifest(
        app=APP, version=version, sequence=sequence, created=0, chunk_size=cs, files=entries
    )


def stage(
    state_dir: Path, version: str, sequence: int, files: Files, *, record: bool = True,
    forced: bool = False, python: PythonEnv | None = None, skip: frozenset[str] = frozenset(),
    verify: bool = True,
) -> bytes:
    """Write updates/<version>/ as the downloader would, mark it STAGED; returns manifest.signed.

    ``python``: the release's env (§7.3.1), naming files among ``files``.
    ``skip``: paths in the manifest left out of staging (unchanged ones, which
    a downloader need not stage). ``verify``: mark_staged's.
    """
    layout = StateLayout.of(state_dir)
    manifest = attrs.evolve(manifest_for(version, sequence, files), python=python)
    signed = sign_manifest(manifest.to_bytes(), [RELEASE_KEY])
    raw = codec.packb(codec.to_wire(signed))
    layout.update_dir(version).mkdir(parents=True, exist_ok=True)
    layout.staged_manifest(version).write_bytes(raw)
    layout.staged_files(version).mkdir(parents=True, exist_ok=True)
    for path, (data, _mode) in files.items():
        if path in skip:
            continue
        target = layout.staged_files(version) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    mark_staged(state_dir, version, verify=verify)
    if record:
        state = load_state(state_dir)
        staged = StagedInfo(version=version, sequence=sequence, forced=forced)
        save_state(state_dir, attrs.evolve(state, staged=staged).raise_high_water(sequence))
    return raw


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes | None]]:
    """Every entry below root: kind, permission bits and content (files)."""
    out: dict[str, tuple[str, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def expected(files: Files) -> dict[str, tuple[str, int, bytes | None]]:
    """The exact tree a release installs into an empty root."""
    out: dict[str, tuple[str, int, bytes | None]] = {}
    for path, (data, mode) in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = ("dir", 0o755, None)
        out[path] = ("file", mode & 0o755, data)
    return out


def run_py(code: str, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (optionally with a crash point armed)."""
    env = {k: v for k, v in os.environ.items() if k != "FLEETPUSH_TEST_CRASH_AT"}
    if crash_at is not None:
        env["FLEETPUSH_TEST_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
