"""An unchanged wheel is an unchanged file: a device copies it from its installed
release instead of downloading it (issue 12, part 1; client/download.py)."""

from __future__ import annotations

import hashlib
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from fleet_helpers import MiniReleaser
from fleetpush.client.download import download
from fleetpush.client.layout import StateLayout
from fleetpush.protocol import PROTOCOL_VERSION, codec
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import Hello
from fleetpush.server import publish_release
from fleetpush.server.pyenv_publish import WHEELS, resolve_env
from fleetpush.server.releases import ReleaseStore
from fp_keys import DEVICE_KEY, RELEASE_KEY
from fp_wheels import make_wheel

from fleetpush.net.dial import dial


@asynccontextmanager
async def connected(port: int):  # type: ignore[no-untyped-def]
    hello = Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id="d1",
        public_key=public_bytes(DEVICE_KEY), app="demo", version="1.0",
    )
    async with dial(("127.0.0.1", port), DEVICE_KEY, hello, timeout=10, name="test") as link:
        yield link.peer


def publish_env(tmp: Path, version: str, pkgs: dict[str, str]):  # type: ignore[no-untyped-def]
    wh = tmp / f"wh-{version}"
    for name, ver in pkgs.items():
        # A big module (stored, not compressed): the wheel spans several chunks.
        blob = "".join(hashlib.sha256(f"{name}{i}".encode()).hexdigest() for i in range(8000))
        make_wheel(wh, name, ver, files={f"{name}/__init__.py": f"BLOB = {blob!r}\n"})
    src = tmp / f"src-{version}"
    src.mkdir()
    (src / "app.py").write_text(f"VERSION = {version!r}\n")
    env = resolve_env(tmp / f"work-{version}", wheelhouse=wh)
    publish_release(tmp / "data", src, app="demo", version=version,
                    signing_keys=[RELEASE_KEY], env=env, chunk_size=64 * 1024)
    store = ReleaseStore.open(tmp / "data")
    try:
        rec = store.get("demo", version)
    finally:
        store.close()
    return rec, Manifest.from_bytes(rec.signed.signed)


async def test_an_unchanged_wheel_is_copied_from_the_installed_release(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    rec1, _m1 = publish_env(tmp_path, "1.0", {"alpha": "1.0", "beta": "1.0"})
    rec2, m2 = publish_env(tmp_path, "2.0", {"alpha": "1.0", "gamma": "1.0"})
    # The device runs 1.0: its files in the app root, its manifest installed.
    layout = StateLayout.of(tmp_path / "state")
    app_root = tmp_path / "app"
    shutil.copytree(rec1.dir, app_root)
    layout.installed_dir.mkdir(parents=True)
    layout.installed_manifest.write_bytes(codec.packb(codec.to_wire(rec1.signed)))

    releaser = MiniReleaser()
    await nursery.start(releaser.serve)
    releaser.add(rec2.dir, rec2.signed, m2)
    with trio.fail_after(30):
        async with connected(releaser.port) as peer:
            result = await download(peer, rec2.signed, m2, layout, app_root)

    alpha = f"{WHEELS}/alpha-1.0-py3-none-any.whl"
    index = {f.path: i for i, f in enumerate(m2.files)}
    served = {m2.files[fi].path for fi, _ in releaser.chunks_served}
    assert alpha not in served  # not one chunk of the unchanged wheel crossed the network
    assert f"{WHEELS}/gamma-1.0-py3-none-any.whl" in served  # the new one did
    # Unchanged (same path, digest, size, mode): no longer copied into staging
    # but not staged at all; install leaves the installed copy (issue 14, item 2).
    assert m2.files[index[alpha]].chunk_count(m2.chunk_size) > 1
    assert result.files_unchanged >= 1
    assert result.bytes_unchanged >= m2.files[index[alpha]].size
    assert not (layout.staged_files("2.0") / alpha).exists()
    assert (app_root / alpha).read_bytes() == (rec2.dir / alpha).read_bytes()
