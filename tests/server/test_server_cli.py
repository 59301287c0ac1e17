"""`fleetpush server` as a real subprocess: listening line, SIGTERM, database state."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio
from fleetpush.protocol import CloseCode
from fleetpush.protocol.messages import CheckUpdate
from server_helpers import connect, publish


def fleetpush_cmd() -> list[str]:
    exe = shutil.which("fleetpush", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "fleetpush.cli.main"]


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        data = await stream.receive_some(1)
        if not data:
            break
        buf += data
    return buf.decode()


async def test_sigterm_stops_gracefully_and_leaves_a_consistent_db(data_dir, tmp_path):
    publish(data_dir, tmp_path, "1.1", approved=True)
    cmd = [
        *fleetpush_cmd(),
        "server",
        "--insecure",  # plain TCP: the test device below speaks it
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--heartbeat",
        "5",
        "--grace-period",
        "2",
    ]
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await read_line(proc.stdout)
            assert line.startswith("listening on 127.0.0.1:"), line
            port = int(line.rsplit(":", 1)[1])
            async with connect(port, peer_id="dev-sig") as dev:
                r = await dev.request("check_update", CheckUpdate(app="demo", version="1.0"))
                assert r.version == "1.1"
                files = await dev.download("demo", "1.1")
                assert files == {"app.txt": b"demo 1.1"}
                proc.send_signal(signal.SIGTERM)
                await dev.peer.wait_closed()
                assert dev.peer.close_code == CloseCode.GOING_AWAY
            assert await proc.wait() == 0
            assert await proc.stdout.receive_some(1000) == b""  # exactly one line
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
    db = sqlite3.connect(data_dir / "fleetpush.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        row = db.execute(
            "SELECT version, sequence FROM devices WHERE device_id = 'dev-sig'"
        ).fetchone()
        assert row == ("1.0", 0)
        kinds = [r[0] for r in db.execute("SELECT kind FROM events ORDER BY seq")]
        assert kinds[0] == "connected" and kinds[-1] == "disconnected"
    finally:
        db.close()


def test_help_documents_every_option():
    out = subprocess.run(
        [*fleetpush_cmd(), "server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--config",
        "--data-dir",
        "--listen",
        "--enrollment",
        "--operator-key",
        "--release-key",
        "--threshold",
        "--server-id",
        "--max-connections",
        "--heartbeat",
        "--handshake-timeout",
        "--frame-timeout",
        "--send-timeout",
        "--grace-period",
        "--chunk-cache-mb",
        "--max-disk-reads",
    ):
        assert flag in out


def test_bad_settings_exit_with_usage_error(tmp_path):
    r = subprocess.run(
        [*fleetpush_cmd(), "server", "--data-dir", str(tmp_path), "--operator-key", "nothex"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "not hex" in r.stderr
