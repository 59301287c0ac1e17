"""A release served from an S3-compatible object store against one in the data dir, measured.

    python scripts/objstore_bench.py [--mib 256] [--devices 4]

Issue 15, part 1 (Artifacts). Needs moto[server], boto3 and obstore (the
``test`` and ``s3`` extras). Starts moto's S3-API server in a separate process
on 127.0.0.1 (nothing else is contacted), publishes one release of ``--mib``
MiB of random bytes twice, into a data dir and into the bucket, and runs a
releaser (the library's ``serve``, in this process) over each. Prints one JSON
object per line:

- ``publish_s``: ``publish_release`` wall time (hash + copy, + upload for S3);
- ``one_device_s`` / ``one_device_mib_s``: one device (the real client's
  ``download``: windowed requests, every chunk verified, files staged and
  fsynced) fetching the whole release from a cold chunk cache;
- ``n_devices_s``: ``--devices`` devices downloading it at once (cold cache),
  with the chunk cache's ``hits``/``misses`` and ``hit_rate`` over that run:
  a miss is a chunk read from the store; ``store_gets``: the ranged GETs
  those misses took (one per run of consecutive chunks; 0 for the data dir).

moto keeps objects in memory and runs in Python: absolute S3 figures are
moto's, not a real store's. Every wait is bounded; the moto process is
terminated at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetpush.client.download import download
from fleetpush.client.layout import StateLayout
from fleetpush.protocol import PROTOCOL_VERSION, Manifest
from fleetpush.protocol.handshake import hash_capabilities
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import GetManifest, Hello
from fleetpush.server import ReleaseStore, ServerConfig, publish_release, serve
from fleetpush.server.artifacts import S3Store

from fleetpush.net.dial import dial

# moto accepts any credentials; these are not secrets.
SECRET = "testing"  # noqa: S105
BUCKET = "bench"
MiB = 1024 * 1024

SERVER = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
s.stop()
"""


def _approve(data_dir: Path, version: str) -> None:
    store = ReleaseStore.open(data_dir)
    try:
        store.set_status("demo", version, "pre-released", "bench")
        store.set_status("demo", version, "approved", "bench")
    finally:
        store.close()


async def _device(port: int, n: int, root: Path) -> float:
    """One device downloading release 2.0 whole with the real client; its seconds."""
    key = Ed25519PrivateKey.generate()
    hello = Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id=f"bench-{n}",
        public_key=public_bytes(key), app="demo", version="1.0",
        # What client/updater.py announces: fixed 1 MiB chunks as plain DATA (its
        # download stages neither content-defined chunks nor DATA_ZSTD yet).
        capabilities=hash_capabilities(),
    )  # fmt: skip
    app_root = root / f"app-{n}"
    app_root.mkdir()
    async with dial(("127.0.0.1", port), key, hello, timeout=30, name="bench") as link:
        r = await link.peer.request("get_manifest", GetManifest(app="demo", version="2.0"))
        manifest = Manifest.from_bytes(r.manifest.signed)
        t = time.perf_counter()
        await download(link.peer, r.manifest, manifest, StateLayout.of(root / f"s-{n}"), app_root)
        return time.perf_counter() - t


async def _serve_and_measure(
    config: ServerConfig, devices: int, mib: int, work: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with trio.fail_after(1800):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            cache = handle.services.cache
            one = await _device(handle.port, 0, work / "one")
            out["one_device_s"] = round(one, 2)
            out["one_device_mib_s"] = round(mib / one, 1)
            # Cold cache again for the crowd: a new releaser would be fairer, but
            # emptying the cache is what a long-running one sees after eviction.
            await handle.shutdown()
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            cache = handle.services.cache
            t = time.perf_counter()
            async with trio.open_nursery() as crowd:
                for n in range(devices):
                    crowd.start_soon(_device, handle.port, n + 1, work / "crowd")
            out["n_devices"] = devices
            out["n_devices_s"] = round(time.perf_counter() - t, 2)
            out["hits"], out["misses"] = cache.hits, cache.misses
            out["hit_rate"] = round(cache.hits / max(1, cache.hits + cache.misses), 3)
            out["store_gets"] = handle.services.artifacts.store_gets
            await handle.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="release size in MiB (default 256)")
    ap.add_argument("--devices", type=int, default=4, help="devices at once (default 4)")
    args = ap.parse_args()
    moto = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert moto.stdout is not None
        url = f"http://127.0.0.1:{moto.stdout.readline().strip()}"
        env = {
            "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
        }  # fmt: skip
        os.environ.update(env)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="fp-objstore-bench-") as tmp:
            work = Path(tmp)
            src = work / "src"
            src.mkdir()
            with open(src / "big.bin", "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(MiB))
            key = Ed25519PrivateKey.generate()
            for where in ("local", "s3"):
                data_dir = work / f"data-{where}"
                store = S3Store(f"s3://{BUCKET}/{where}") if where == "s3" else None
                t = time.perf_counter()
                publish_release(
                    data_dir, src, app="demo", version="2.0", signing_keys=[key],
                    chunking="fixed", store=store,
                )  # fmt: skip
                publish_s = time.perf_counter() - t
                _approve(data_dir, "2.0")
                config = ServerConfig(data_dir=data_dir, port=0, grace_period=1.0)
                (work / where).mkdir()
                for sub in ("one", "crowd"):
                    (work / where / sub).mkdir()
                row = {"store": where, "mib": args.mib, "chunking": "fixed"}
                row["publish_s"] = round(publish_s, 2)
                row.update(
                    trio.run(_serve_and_measure, config, args.devices, args.mib, work / where)
                )
                print(json.dumps(row), flush=True)
    finally:
        if moto.stdin is not None:
            moto.stdin.close()
        try:
            moto.wait(timeout=10)
        except subprocess.TimeoutExpired:
            moto.kill()


if __name__ == "__main__":
    main()
