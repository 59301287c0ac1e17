"""kill -9 of a real ``fleetpush update`` mid-download; the next attempt re-verifies
the staged chunks and fetches only the missing ones from the real releaser."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio
from fleet_helpers import (
    OPERATOR_KEY,
    RELEASE_KEY,
    InProcessHost,
    chunks_valid,
    device_config,
    key_hex,
    make_tree,
    releaser,
    write_agent_toml,
)
from fleetpush.client import Updater
from fleetpush.client.download import read_signed_manifest
from fleetpush.client.layout import StateLayout
from fleetpush.protocol.manifest import Manifest
from fleetpush.server import publish_release

from fleetpush.operator import connect as operator_connect

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))
SIZE = 6 * 1024 * 1024


async def test_kill9_during_download_resumes_only_missing_chunks(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with releaser(tmp_path) as handle:
            src = make_tree(tmp_path / "src", {"big.bin": SIZE, "app.txt": b"v2\n"}, seed=5)
            publish_release(
                tmp_path / "data",
                src,
                app="demo",
                version="2.0",
                signing_keys=[RELEASE_KEY],
                chunk_size=64 * 1024,
            )
            async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                await op.approve("demo", "2.0")
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
