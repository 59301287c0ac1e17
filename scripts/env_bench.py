"""How long a device takes to build a release's Python env, and to roll it back.

    python scripts/env_bench.py [--rounds 5] [--cache DIR]

20 small pure-Python wheels (:data:`PACKAGES`) are downloaded once with pip
into ``--cache`` (the only step that uses the network; later runs reuse
them). A release carrying them is made with the real publisher
(``resolve_env`` + ``build_manifest``, signed with a throwaway key) and staged
in a temporary state dir as the downloader would leave it. Then, in
interleaved rounds (uv, pip, uv, pip, ... so other load on the machine hits
both alike):

* **build**: ``pyenv.prepare`` from nothing (``envs/`` removed first, uv's
  cache with it: a device's first build of these wheels), with the smoke
  check importing one module of each wheel;
* **build (uv, warm cache)**: the same with uv's cache kept, i.e. a later
  release sharing wheels with an earlier one;
* **envs/current switch**: ``pyenv.sync_link`` alone, re-pointing the link
  between two built envs (temp symlink, rename, directory fsync);
* **rollback**: ``install.rollback`` of an applied release with an env back to
  the previous one, whose env is kept: restoring the (two) app files, the
  manifest and state, and the ``envs/current`` switch (a new version each
  round, whose env is built before it, outside the timing).

Printed: median and min-max seconds of each. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.client import pyenv
from fleetpush.client.install import apply_staged, mark_staged, rollback
from fleetpush.client.layout import StateLayout
from fleetpush.protocol import codec
from fleetpush.protocol.manifest import Manifest, sign_manifest
from fleetpush.server.publish import build_manifest
from fleetpush.server.pyenv_publish import resolve_env

#: 20 small pure-Python distributions without dependencies: (name, import name).
PACKAGES = [
    ("six", "six"), ("idna", "idna"), ("attrs", "attr"), ("packaging", "packaging"),
    ("toml", "toml"), ("tomli", "tomli"), ("certifi", "certifi"), ("urllib3", "urllib3"),
    ("click", "click"), ("colorama", "colorama"), ("itsdangerous", "itsdangerous"),
    ("decorator", "decorator"), ("iniconfig", "iniconfig"), ("pluggy", "pluggy"),
    ("sniffio", "sniffio"), ("h11", "h11"), ("typing-extensions", "typing_extensions"),
    ("zipp", "zipp"), ("more-itertools", "more_itertools"), ("mdurl", "mdurl"),
]


def fetch_wheels(cache: Path) -> Path:
    if len(list(cache.glob("*.whl"))) < len(PACKAGES):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "-d", str(cache), *(name for name, _ in PACKAGES)],
            check=True,
        )
    return cache


def stage_release(
    work: Path, state: Path, version: str, sequence: int, *, wheels: Path, key: Ed25519PrivateKey
) -> Manifest:
    """Publish-side manifest of an app + env, staged under ``state`` as downloaded."""
    src = work / f"src-{version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "app.py").write_text(f"VERSION = {version!r}\n")
    env = resolve_env(
        work / f"env-{version}", wheelhouse=wheels, imports=[mod for _, mod in PACKAGES]
    )
    manifest = build_manifest(src, app="bench", version=version, sequence=sequence, env=env)
    layout = StateLayout.of(state)
    files = layout.staged_files(version)
    shutil.rmtree(layout.update_dir(version), ignore_errors=True)
    files.mkdir(parents=True)
    for rel, path in [("app.py", src / "app.py"), *env.files]:
        (files / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, files / rel)
    signed = sign_manifest(manifest.to_bytes(), [key])
    layout.staged_manifest(version).write_bytes(codec.packb(codec.to_wire(signed)))
    mark_staged(state, version)
    return manifest


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def figure(name: str, xs: list[float]) -> str:
    return (f"{name:<26} median {statistics.median(xs):7.3f} s   "
            f"min-max {min(xs):.3f}-{max(xs):.3f} s   ({len(xs)} rounds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    default_cache = Path.home() / ".cache" / "fleetpush-env-bench"
    parser.add_argument("--cache", type=Path, default=default_cache)
    args = parser.parse_args()
    wheels = fetch_wheels(args.cache)
    tools = ["uv", "pip"] if pyenv.find_uv() else ["pip"]
    results: dict[str, list[float]] = {}
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="fp-env-bench-") as tmp:
        work, state, root = Path(tmp) / "work", Path(tmp) / "state", Path(tmp) / "app"
        layout = StateLayout.of(state)
        manifest = stage_release(work, state, "1.0", 1, wheels=wheels, key=key)
        envs = pyenv.envs_dir(layout)
        for _ in range(args.rounds):
            for tool in tools:
                shutil.rmtree(envs, ignore_errors=True)
                settings = pyenv.BuildSettings(tool=tool)
                results.setdefault(f"build, {tool}", []).append(
                    timed(lambda s=settings: pyenv.prepare(layout, root, manifest, s))
                )
            if "uv" in tools:
                shutil.rmtree(pyenv.env_path(layout, manifest))  # uv's cache stays
                results.setdefault("build, uv, warm cache", []).append(
                    timed(lambda: pyenv.prepare(layout, root, manifest))
                )
        # Rollback: 1.0 installed with its env, then 2.0 applied and rolled back.
        apply_staged(state, root, "1.0", time.time())
        for i in range(args.rounds):
            # A new version each round: a rolled-back one is marked bad.
            stage_release(work, state, f"2.{i}", 2 + i, wheels=wheels, key=key)
            apply_staged(state, root, f"2.{i}", time.time() + i)  # builds its env (untimed)
            assert pyenv.current_env(layout) == pyenv.envs_dir(layout) / f"2.{i}-{2 + i}"
            results.setdefault("rollback (files + env)", []).append(
                timed(lambda: rollback(state, root, "bench"))
            )
            assert pyenv.current_env(layout) == pyenv.envs_dir(layout) / "1.0-1"
        # The link switch alone (what a rollback adds for the env): the
        # installed manifest alternates between 1.0's and 9.0's (untimed),
        # both envs built; sync_link re-points envs/current (timed).
        m9 = stage_release(work, state, "9.0", 99, wheels=wheels, key=key)
        pyenv.prepare(layout, root, m9)
        manifests = [
            layout.installed_manifest.read_bytes(), layout.staged_manifest("9.0").read_bytes()
        ]
        for i in range(args.rounds * 4):
            layout.installed_manifest.write_bytes(manifests[(i + 1) % 2])
            results.setdefault("envs/current switch", []).append(
                timed(lambda: pyenv.sync_link(layout))
            )
        layout.installed_manifest.write_bytes(manifests[0])
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    size = sum(p.stat().st_size for p in wheels.glob("*.whl")) // 1024
    uv = "found" if "uv" in tools else "not found"
    print(f"{len(PACKAGES)} wheels, {size} KiB; python {sys.version.split()[0]}; uv {uv}")
    for name, xs in results.items():
        print(figure(name, xs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
