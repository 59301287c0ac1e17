"""Release artifacts in an S3-compatible object store (issue 15, part 1, Artifacts).

Against the real S3-API endpoint of tests/support/fp_s3.py (moto over HTTP on
loopback): publish there, a real Updater downloads and installs; a store that
cannot be reached refuses its chunks in one line while local releases are
still served; a tampered object is refused by the device; a publish that
fails midway leaves nothing served and no objects.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client import Updater
from fleetpush.protocol import ErrorCode, Manifest, RpcError
from fleetpush.protocol.compression import decompress_chunk
from fleetpush.protocol.errors import IntegrityError
from fleetpush.protocol.handshake import VARIABLE_CHUNKS, ZSTD
from fleetpush.protocol.messages import GetChunks, GetManifest
from fleetpush.server import ReleaseStore
from fleetpush.server.artifacts import (
    LocalStore,
    S3Store,
    StoreOptions,
    remove_release,
    split_url,
)
from fleetpush.server.errors import IllegalTransition, ObjectStoreError
from fleetpush.server.release_purge import purge_release
from fp_devices import device_config
from fp_releaser import publish, releaser, start_releaser_process
from fp_s3 import S3Bucket
from fp_trees import make_tree
from server_helpers import connect

MiB = 1024 * 1024


class Host:
    """Applies a staged release with the install engine, in process (no exec)."""

    supervises = True

    def __init__(self) -> None:
        self.applied: list[str] = []

    async def apply(self, ctx: Any, version: str) -> None:
        from fleetpush.client.install import apply_staged

        cfg = ctx.config
        await trio.to_thread.run_sync(
            lambda: apply_staged(cfg.state_dir, cfg.app_root, version, time.time())
        )
        ctx.store.reload()
        self.applied.append(version)

    async def restart_after_rollback(self, ctx: Any) -> None:
        return None


@pytest.fixture
def s3_env(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """The bucket's endpoint and credentials in the standard AWS_* variables."""
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)
    return s3_bucket


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    text = b"".join(b"setting %d = %d\n" % (i, i * 7) for i in range(120_000))  # zstd shrinks it
    return {
        "bin/app": rng.randbytes(3 * MiB + 4321),
        "etc/app.conf": text,
        "README": b"hello\n",
        "empty": b"",
    }


def _objects(bucket: S3Bucket) -> list[str]:
    return S3Store(bucket.url()).list("")


def _rows(data_dir: Path) -> list[str]:
    store = ReleaseStore.open(data_dir)
    try:
        return [f"{r.app} {r.version}" for r in store.list()]
    finally:
        store.close()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("chunking", ["fixed", "cdc"])
async def test_a_release_in_the_object_store_is_downloaded_and_installed(
    s3_env: S3Bucket, tmp_path: Path, chunking: str, compress: bool
) -> None:
    data_dir = tmp_path / "data"
    files = _files(1)
    src = make_tree(tmp_path / "src", files)
    store = S3Store(s3_env.url("fleet/a"))
    publish(data_dir, src, "2.0", approved=True, chunking=chunking, compress=compress, store=store)
    # Nothing of the release in the data dir; all of it under the prefix.
    assert not any(p.name.startswith("r-") for p in (data_dir / "releases").iterdir())
    objects = _objects(s3_env)
    assert all(o.startswith("fleet/a/releases/r-") for o in objects)
    assert len([o for o in objects if o.endswith(".zst")]) == int(compress)
    with trio.fail_after(60):
        async with releaser(data_dir, store=s3_env.url("fleet/a")) as server:
            # A device announcing chunks-v and zstd, checking every chunk (§7.3.3, §2.3.1).
            caps = [VARIABLE_CHUNKS, ZSTD]
            async with connect(server.port, peer_id="d-1", capabilities=caps) as dev:
                got, zstd = await _fetch_all(dev, "2.0")
            assert got == files
            assert (zstd > 0) == compress
            if chunking == "fixed":
                # The real updater (it announces neither chunks-v nor zstd yet:
                # client/updater.py), installing into its app root.
                host = Host()
                cfg = device_config(tmp_path / "device", server.port)
                async with Updater(cfg, host=host).connected() as updater:
                    await updater.update()
                assert host.applied == ["2.0"]
                for rel, data in files.items():
                    assert (cfg.app_root / rel).read_bytes() == data
            assert server.services.cache.misses > 0


async def _fetch_all(dev: Any, version: str) -> tuple[dict[str, bytes], int]:
    """Every file of ``version``, each chunk checked against the manifest; and the zstd count."""
    r = await dev.request("get_manifest", GetManifest(app="demo", version=version))
    manifest = Manifest.from_bytes(r.manifest.signed)
    wanted = [(i, c) for i, f in enumerate(manifest.files) for c in range(len(f.chunks))]
    parts: dict[tuple[int, int], bytes] = {}
    zstd = 0
    for start in range(0, len(wanted), 32):
        stream, done = await dev.peer.request_chunks(
            GetChunks(app="demo", version=version, chunks=wanted[start : start + 32])
        )
        async for got in stream:
            entry = manifest.files[got.file]
            data = bytes(got.payload)
            if got.compressed:
                zstd += 1
                data = decompress_chunk(data, entry.chunk_span(manifest.chunk_size, got.chunk)[1])
            assert hashlib.sha256(data).digest() == entry.chunks[got.chunk]
            parts[(got.file, got.chunk)] = data
        await done()
    out = {
        f.path: b"".join(parts[(i, c)] for c in range(len(f.chunks)))
        for i, f in enumerate(manifest.files)
    }
    return out, zstd


async def test_an_unreachable_store_refuses_its_chunks_and_local_releases_are_served(
    s3_env: S3Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    local = {"a.bin": random.Random(2).randbytes(MiB + 5)}
    remote = {"b.bin": random.Random(3).randbytes(MiB + 7)}
    publish(data_dir, make_tree(tmp_path / "l", local), "1.1", approved=True)
    store = S3Store(s3_env.url("p"))
    publish(data_dir, make_tree(tmp_path / "r", remote), "1.2", approved=True, store=store)
    with socket_closed() as dead:
        kw = dict(store=s3_env.url("p"), store_endpoint=dead, store_timeout=3.0)
        with trio.fail_after(60):
            async with releaser(data_dir, **kw) as server, connect(server.port, peer_id="d") as dev:
                with pytest.raises(RpcError) as e:
                    await dev.download("demo", "1.2")
                assert e.value.code == ErrorCode.UNAVAILABLE
                want = "b.bin chunk 0 of demo 1.2 could not be read from the object store: "
                assert e.value.message.startswith(want), e.value.message
                assert "\n" not in e.value.message
                assert await dev.download("demo", "1.1") == local
    assert any("refusing to serve" in r.getMessage() for r in caplog.records)


class socket_closed:
    """An http:// endpoint on a loopback port nothing listens on (for the block)."""

    def __enter__(self) -> str:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_tampered_object_is_refused_by_the_device(s3_env: S3Bucket, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    files = {"app.bin": random.Random(4).randbytes(2 * MiB)}
    store = S3Store(s3_env.url())
    publish(data_dir, make_tree(tmp_path / "src", files), "2.0", approved=True, store=store)
    (name,) = [o for o in store.list("releases") if o.endswith("/app.bin")]
    forged = bytearray(files["app.bin"])
    forged[MiB + 10] ^= 0xFF  # same size: only the device's digest check can tell
    (tmp_path / "forged").write_bytes(forged)
    store.put_file(name, tmp_path / "forged")
    host = Host()
    with trio.fail_after(60):
        async with releaser(data_dir, store=s3_env.url()) as server:
            async with connect(server.port, peer_id="d-1") as dev:
                with pytest.raises(AssertionError):  # its digest check (server_helpers)
                    await dev.download("demo", "2.0")
            cfg = device_config(tmp_path / "device", server.port)
            async with Updater(cfg, host=host).connected() as updater:
                with pytest.raises(IntegrityError):
                    await updater.update()
            server.services.writer.flush()
            row = server.services.devices.get("dev-1")
    assert host.applied == []
    assert not (cfg.app_root / "app.bin").exists()
    # The releaser has the device's report of the refusal.
    assert row is not None and row["state"] == "failed", dict(row or {})


class FailingStore:
    """An S3Store whose second upload fails, as a dropped endpoint would."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def put_file(self, name: str, path: Path) -> None:
        self.puts += 1
        if self.puts == 2:
            raise ObjectStoreError("cannot upload: connection reset")
        self.store.put_file(name, path)


def test_a_publish_that_fails_midway_leaves_nothing_served(
    s3_env: S3Bucket, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    src = make_tree(tmp_path / "src", _files(5))
    failing = FailingStore(S3Store(s3_env.url()))
    with pytest.raises(ObjectStoreError, match="connection reset"):
        publish(data_dir, src, "2.0", store=failing)
    assert failing.puts == 2
    assert _rows(data_dir) == []
    assert _objects(s3_env) == []
    assert [p.name for p in (data_dir / "releases").iterdir()] == []
    # A conflict found when the row is written (after the uploads) removes them too.
    publish(data_dir, src, "2.0", store=S3Store(s3_env.url()))
    kept = _objects(s3_env)
    with pytest.raises(Exception, match="already published"):
        publish(data_dir, src, "2.0", store=S3Store(s3_env.url()), sequence=9)
    assert _objects(s3_env) == kept
    assert _rows(data_dir) == ["demo 2.0"]


def test_removing_a_release_deletes_its_objects(s3_env: S3Bucket, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = S3Store(s3_env.url("x"))
    src = make_tree(tmp_path / "src", _files(6))
    publish(data_dir, src, "2.0", store=store, compress=True)
    publish(data_dir, src, "2.1", store=store)
    rs = ReleaseStore.open(data_dir)
    try:
        first, second = rs.get("demo", "2.0"), rs.get("demo", "2.1")
    finally:
        rs.close()
    assert first.remote and first.location.startswith(s3_env.url("x/releases/r-"))
    name = split_url(first.location)[1].removeprefix("x/")
    gone = remove_release(store, name)
    assert any(n.endswith(".zst") for n in gone) and len(gone) == 5
    left = _objects(s3_env)
    assert left and all(o.startswith(split_url(second.location)[1] + "/") for o in left)


def test_the_local_store_has_the_same_interface(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "f").write_bytes(b"0123456789")
    store.put_file("releases/r-1/a/b", tmp_path / "f")
    store.put_file("releases/r-1.zst", tmp_path / "f")
    assert store.get_range("releases/r-1/a/b", 2, 3) == b"234"
    assert store.exists("releases/r-1/a/b") and not store.exists("releases/r-2")
    assert remove_release(store, "releases/r-1") == ["releases/r-1/a/b", "releases/r-1.zst"]
    assert store.list("releases") == []


@pytest.mark.parametrize("url", ["s3://", "http://bucket/p", "s3://bucket/p?x=1", "bucket/prefix"])
def test_a_bad_store_url_is_refused(url: str) -> None:
    with pytest.raises(ObjectStoreError, match="not an object store URL"):
        S3Store(url, StoreOptions())


def test_the_cli_publishes_to_the_store_and_fails_in_one_line(
    s3_env: S3Bucket, tmp_path: Path, release_key_file: Path
) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": b"hello\n"})
    data_dir = tmp_path / "data"
    base = [sys.executable, "-P", "-m", "fleetpush.cli.main", "release", "publish", str(src)]
    base += ["--app", "demo", "--data-dir", str(data_dir), "--key", str(release_key_file)]
    env = {**os.environ, **s3_env.env()}
    ok = subprocess.run(
        [*base, "--version", "1.0", "--store", s3_env.url("cli")],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert any(o.startswith("cli/releases/r-") and o.endswith("/a.txt") for o in _objects(s3_env))
    bad = subprocess.run(
        [*base, "--version", "1.1", "--store", "gs://elsewhere"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "fleetpush: 'gs://elsewhere' is not an object store URL [use s3://bucket/prefix]"
    ]
    assert _rows(data_dir) == ["demo 1.0"]
    purge = [sys.executable, "-P", "-m", "fleetpush.cli.main", "release", "purge", "demo", "1.0"]
    refused = subprocess.run(
        [*purge, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        "fleetpush: demo 1.0 is draft: only a revoked release can be purged "
        "[fleetpush release revoke demo 1.0]"
    ]


@pytest.fixture
def release_key_file(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from fp_keys import RELEASE_KEY

    path = tmp_path / "release.key"
    path.write_bytes(
        RELEASE_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_store_settings_are_checked(tmp_path: Path) -> None:
    from fleetpush.server import ServerConfig
    from fleetpush.server.errors import ConfigError

    with pytest.raises(ConfigError, match="not an object store URL"):
        ServerConfig(data_dir=tmp_path, store="/var/lib/store")
    assert ServerConfig(data_dir=tmp_path, store="s3://b/p").store == "s3://b/p"


def _revoke(data_dir: Path, version: str) -> None:
    store = ReleaseStore.open(data_dir)
    try:
        store.set_status("demo", version, "revoked", "test")
    finally:
        store.close()


def test_purging_a_revoked_release_deletes_its_row_then_its_objects(
    s3_env: S3Bucket, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    src = make_tree(tmp_path / "src", _files(7))
    publish(data_dir, src, "2.0", store=S3Store(s3_env.url("p")), compress=True)
    publish(data_dir, src, "2.1")  # in the data dir
    with pytest.raises(IllegalTransition, match=r"only a revoked release can be purged"):
        purge_release(data_dir, "demo", "2.0")
    assert len(_objects(s3_env)) == 5
    _revoke(data_dir, "2.0")
    assert purge_release(data_dir, "demo", "2.0").startswith(s3_env.url("p/releases/r-"))
    assert _objects(s3_env) == []
    assert _rows(data_dir) == ["demo 2.1"]
    # The data dir's kind: its directory goes.
    _revoke(data_dir, "2.1")
    assert [p.name for p in (data_dir / "releases").iterdir() if p.name.startswith("r-")]
    purge_release(data_dir, "demo", "2.1")
    assert not [p for p in (data_dir / "releases").iterdir() if p.name.startswith("r-")]
    assert _rows(data_dir) == []


async def test_a_hanging_store_does_not_hold_the_data_dirs_reads(
    s3_env: S3Bucket, tmp_path: Path
) -> None:
    # Object store reads have their own worker threads (ChunkCache store_reads):
    # with more reads hanging on the store than there are disk reads
    # (max_disk_reads), a release in the data dir is still served meanwhile.
    data_dir = tmp_path / "data"
    rng = random.Random(8)
    remote = {f"f{i}.bin": rng.randbytes(300_000) for i in range(6)}
    local = {"a.bin": rng.randbytes(MiB + 3)}
    publish(data_dir, make_tree(tmp_path / "r", remote), "1.2", approved=True,
            store=S3Store(s3_env.url()))  # fmt: skip
    publish(data_dir, make_tree(tmp_path / "l", local), "1.3", approved=True)
    accepted: list[trio.SocketStream] = []

    async def hang(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    refused: list[str] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            (listener,) = await outer.start(
                functools.partial(trio.serve_tcp, hang, 0, host="127.0.0.1")
            )
            endpoint = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
            kw = dict(store=s3_env.url(), store_endpoint=endpoint, store_timeout=5.0,
                      max_disk_reads=2)  # fmt: skip
            async with releaser(data_dir, **kw) as server:

                async def fetch_remote(i: int) -> None:
                    async with connect(server.port, peer_id=f"r-{i}") as dev:
                        with pytest.raises(RpcError) as e:
                            await dev.request(
                                "get_chunks",
                                GetChunks(app="demo", version="1.2", chunks=[(i, 0)]),
                                timeout=30,
                            )
                        refused.append(e.value.message)

                async with trio.open_nursery() as crowd:
                    for i in range(len(remote)):
                        crowd.start_soon(fetch_remote, i)
                    while len(accepted) < 3:  # more than max_disk_reads hanging
                        await trio.sleep(0.05)
                    async with connect(server.port, peer_id="l-1") as dev:
                        assert await dev.download("demo", "1.3") == local
                    assert refused == []  # the store's reads were still hanging
            outer.cancel_scope.cancel()
    assert len(refused) == len(remote)
    assert all("could not be read from the object store" in m for m in refused), refused


async def test_a_fleetpush_server_process_serves_a_release_from_the_store(
    s3_env: S3Bucket, tmp_path: Path
) -> None:
    # The CLI's --store/--store-endpoint reach the releaser (a real process; the
    # credentials come through the AWS_* variables it inherits).
    data_dir = tmp_path / "data"
    files = {"a.bin": random.Random(9).randbytes(MiB + 1)}
    publish(data_dir, make_tree(tmp_path / "src", files), "2.0", approved=True,
            store=S3Store(s3_env.url("proc")))  # fmt: skip
    proc, port = start_releaser_process(
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--insecure",
        "--store", s3_env.url("proc"), "--store-endpoint", s3_env.endpoint_url,
    )  # fmt: skip
    try:
        with trio.fail_after(30):
            async with connect(port, peer_id="d-1") as dev:
                assert await dev.download("demo", "2.0") == files
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_server_whose_store_url_is_bad_does_not_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-m", "fleetpush.cli.main", "server", "--data-dir",
         str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--insecure", "--store", "s3://"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "fleetpush server: store: 's3://' is not an object store URL [use s3://bucket/prefix]"
    )
