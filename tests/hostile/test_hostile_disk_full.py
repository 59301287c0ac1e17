"""Disk full in the middle of a download (issue 6; needs root to mount a tmpfs).

The device's state directory (where updates are staged) is a 12 MiB tmpfs the
test mounts. The free-space check passes when the 6 MiB download starts; once
2 MiB have arrived (1 MB/s through the fault proxy) the test fills the rest of
the filesystem. Staging must fail cleanly with DiskFullError, report the
reason to the releaser, leave the running version untouched, and succeed
(resuming) once the space is freed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from faultproxy import FaultProxy, Faults
from fleetpush.client.errors import DiskFullError
from fleetpush.client.state import load_state
from fleetpush.client.updater import Updater
from fp_fs import fill, small_tmpfs
from fp_releaser import releaser
from fp_trees import make_release_dir, tree_digests
from hostile_fleet import device_config, publish_approved, staged_digests

SIZE = 6 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs (fp_fs.py; needs root)."""
    with small_tmpfs(tmp_path, "12m") as mnt:
        yield mnt


@pytest.mark.slow
async def test_disk_fills_mid_download_fails_cleanly_then_succeeds(
    tmp_path: Path, small_fs: Path
) -> None:
    src = make_release_dir(tmp_path / "src", SIZE)
    publish_approved(tmp_path / "data", src, "2.0.0", chunk_size=256 * 1024)
    device_root = tmp_path / "device"
    (device_root / "app").mkdir(parents=True)
    (device_root / "app" / "running.txt").write_text("v1\n")
    before = tree_digests(device_root / "app")
    with trio.fail_after(90):
        async with releaser(tmp_path / "data") as handle, trio.open_nursery() as nursery:
            proxy = FaultProxy(handle.port, Faults(rate=1e6))
            await nursery.start(proxy.run)
            config = device_config(
                device_root, f"127.0.0.1:{proxy.port}", "disk-dev", state_dir=small_fs / "state"
            )
            updater = Updater(config)
            async with updater.connected():
                info = await updater.check()
                assert info.verified is not None
                filler = small_fs / "filler"

                async def fill_when_half_done() -> None:
                    while proxy.bytes_down < 2 * 1024 * 1024:
                        await trio.sleep(0.05)
                    await trio.to_thread.run_sync(fill, filler)

                nursery.start_soon(fill_when_half_done)
                with pytest.raises(DiskFullError) as failed:
                    await updater.stage(info.verified)
                print(f"\nrefused cleanly: {failed.value}")
                assert filler.exists()
                # The running version is untouched, nothing was marked staged.
                s = load_state(small_fs / "state")
                assert s.installed_version == "1.0.0" and s.staged is None
                assert tree_digests(device_root / "app") == before
                # The reason reached the releaser. update_progress is a
                # notification, so it may still be in flight: wait for it.
                failures = []
                with trio.move_on_after(10):
                    while not failures:
                        events = handle.services.events.history(50, device_id="disk-dev")
                        failures = [e for e in events if e.data.get("state") == "failed"]
                        await trio.sleep(0.02)
                assert failures and failures[-1].data.get("error")
                assert "space" in failures[-1].data["error"]
                assert "2.0.0" in failures[-1].data.get("version", "")
                # Space freed: the same update now stages, resuming what was written.
                print(f"reported to the releaser: {failures[-1].data['error']}")
                filler.unlink()
                await updater.stage(info.verified)
                result = updater.last_download
                assert result is not None
                print(
                    f"after freeing space: {result.bytes_fetched / 1e6:.1f} MB fetched, "
                    f"{result.bytes_resumed / 1e6:.1f} MB kept from the first attempt"
                )
                assert result.bytes_resumed > 0, "nothing of the first attempt was kept"
            nursery.cancel_scope.cancel()
    assert staged_digests(small_fs / "state", "2.0.0") == tree_digests(src)
    assert load_state(small_fs / "state").staged is not None
