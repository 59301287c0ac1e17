"""kill -9 of a real ``fleetpush update`` mid-download; the next attempt re-verifies
the staged chunks and fetches only the missing ones from the real releaser.

Both with fixed chunks and with content-defined (variable-size) chunks
(issue 14, item 4): a resume finds each chunk at the offset its manifest
gives it (FileEntry.chunk_span), not at ``index * chunk_size``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from fleet_helpers import InProcessHost, chunks_valid
from fleetpush.client import Updater
from fleetpush.client.layout import StateLayout
from fleetpush.client.staging import read_signed_manifest
from fleetpush.protocol.manifest import Manifest
from fp_devices import device_config, write_agent_toml
from fp_keys import RELEASE_KEY, key_hex
from fp_releaser import publish_and_approve, releaser
from fp_trees import make_tree, noise

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))
SIZE = 6 * 1024 * 1024


@pytest.mark.parametrize("chunking", ["fixed", "cdc"])
async def test_kill9_during_download_resumes_only_missing_chunks(
    tmp_path: Path, chunking: str
) -> None:
    with trio.fail_after(60):
        async with releaser(tmp_path / "data", heartbeat=5.0) as handle:
            if chunking == "fixed":
                content: bytes | int = SIZE
                kw: dict[str, object] = {"chunk_size": 64 * 1024}
            else:  # cut by FastCDC (16/64/256 KiB); noise, so the cuts vary
                content = b"".join(noise(b"kill9", SIZE))
                kw = {"chunking": "cdc"}
            src = make_tree(tmp_path / "src", {"big.bin": content, "app.txt": b"v2\n"}, seed=5)
            await publish_and_approve(handle, tmp_path / "data", src, "2.0", **kw)
            cfg = device_config(tmp_path / "dev", handle.port)
            toml = write_agent_toml(
                tmp_path / "agent.toml",
                app="demo",
                version="1.0",
                device_id="dev-1",
                state_dir=str(cfg.state_dir),
                app_root=str(cfg.app_root),
                server=cfg.server,
                trusted_keys=[key_hex(RELEASE_KEY)],
                max_download_rate=3_000_000,
                insecure=True,
            )
            layout = StateLayout.of(cfg.state_dir)
            big = layout.staged_files("2.0") / "big.bin"
            proc = subprocess.Popen(
                [FLEETPUSH, "update", "--no-start", "--config", str(toml)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while not (big.exists() and big.stat().st_blocks * 512 > SIZE // 4):
                    assert proc.poll() is None, "the update finished before it could be killed"
                    await trio.sleep(0.02)
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
            signed = read_signed_manifest(layout.staged_manifest("2.0"))
            assert signed is not None
            m = Manifest.from_bytes(signed.signed)
            if chunking == "cdc":
                assert (
                    len(
                        {
                            f.chunk_span(m.chunk_size, i)[1]
                            for f in m.files
                            for i in range(len(f.chunks))
                        }
                    )
                    > 2
                )
            valid = chunks_valid(layout.staged_files("2.0"), m)
            assert 0 < len(valid) < m.total_chunks
            host = InProcessHost()
            async with Updater(cfg, host=host).connected() as updater:
                await updater.update()
            result = updater.last_download
            assert result is not None
            assert result.chunks_resumed == len(valid)
            assert result.chunks_fetched == m.total_chunks - len(valid)
            assert host.applied == ["2.0"]
            assert (cfg.app_root / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
