"""kill -9 of a releaser loses nothing: its devices finish their push on the other (issue 15).

Real parts only: one real PostgreSQL (fp_pg), two ``fleetpush server``
subprocesses on it (port 0; one data dir for the release files, as an NFS
mount or an object store would give both), and real ``fleetpush agent``
processes configured with both addresses (client/failover.py), each chosen so
that its own address order starts with A. A push is in flight (the devices
are on trial of 2.0.0, not committed) when A is killed outright. The devices
reconnect to B, take their leases there (server/leases.py), are offered
their unfinished push again (the rows are the truth: registry.next_pending)
and commit. The rows read before the kill are all still there after, none
twice: pushes, push targets, acknowledged outcome reports (§7.6.1), and the
``committed`` history of each device appears exactly once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fleetpush.client.failover import device_order
from fleetpush.server import db
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY, key_hex
from fp_releaser import publish, start_releaser_process
from fp_trees import app_release

from fleetpush.operator import connect as operator_connect

pytestmark = pytest.mark.slow


def _start(data_dir: Path, database: str) -> tuple[subprocess.Popen[str], str]:
    proc, port = start_releaser_process(
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--database", database,
        "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
    )  # fmt: skip
    return proc, f"127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def rows(pg_url: str, tmp_path: Path) -> Iterator[db.Connection]:
    """A connection of our own to the releasers' database, to read their rows."""
    conn = db.open_database(tmp_path / "reader", pg_url)
    try:
        yield conn
    finally:
        conn.close()


def _holders(conn: db.Connection) -> dict[str, str]:
    """device id -> address of the releaser its lease names."""
    return {
        str(r[0]): str(r[1])
        for r in conn.execute(
            "SELECT l.device_id, r.address FROM device_leases l"
            " JOIN releasers r ON r.releaser_id = l.releaser_id"
        )
    }


def _snapshot(conn: db.Connection) -> dict[str, Any]:
    return {
        "pushes": sorted(
            tuple(r) for r in conn.execute("SELECT push_id, app, version FROM pushes")
        ),
        "targets": sorted(
            tuple(r) for r in conn.execute("SELECT id, push_id, device_id FROM push_targets")
        ),
        "reports": sorted(
            tuple(r) for r in conn.execute("SELECT device_id, report_id FROM reports")
        ),
    }


def _committed_events(conn: db.Connection, device_id: str) -> int:
    n = conn.execute(
        "SELECT COUNT(*) FROM events WHERE device_id = ? AND kind IN ('progress', 'report')"
        " AND json_extract(data, '$.state') = 'committed'",
        (device_id,),
    ).fetchone()
    return int(n[0])


async def _until(pred: Any, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(pred):
            await trio.sleep(0.2)


async def test_kill9_of_a_releaser_mid_push_loses_nothing_and_the_devices_finish_on_b(
    tmp_path: Path, pg_url: str, rows: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETPUSH_DATABASE", pg_url)  # publish writes the release rows there
    data = tmp_path / "data"
    publish(data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0", approved=True)
    a, addr_a = _start(data, pg_url)
    b, addr_b = _start(data, pg_url)
    devs: list[AgentDevice] = []
    try:
        # Devices whose own failover order tries A first (client/failover.py).
        ids = [d for d in (f"d{i}" for i in range(40)) if device_order([addr_a, addr_b], d)[0]
               == addr_a][:2]  # fmt: skip
        assert len(ids) == 2
        devs = [
            AgentDevice(
                tmp_path / d, 0, device_id=d, server=[addr_a, addr_b], reconnect_spread=1.0,
                heartbeat=2.0, confirm_after=6.0, trial_seconds=60,
            )
            for d in ids
        ]  # fmt: skip
        for dev in devs:
            await dev.start_agent()
        await _until(lambda: all(_holders(rows).get(d) == addr_a for d in ids), 60)

        port_a = int(addr_a.rsplit(":", 1)[1])
        with trio.fail_after(30):
            async with operator_connect(("127.0.0.1", port_a), OPERATOR_KEY) as op:
                await op.push(app="demo", version="2.0.0", mode="force", restart=True, devices=ids)
        # In flight: installed and on trial, not committed (confirm_after 6 s).
        with trio.fail_after(60):
            for dev in devs:
                await dev.wait_state(lambda s: s.trial is not None)
        before = _snapshot(rows)
        assert len(before["pushes"]) == 1 and len(before["targets"]) == 2

        _stop(a)  # SIGKILL: no goodbye, no lease freed, nothing flushed after this
        await _until(lambda: all(_holders(rows).get(d) == addr_b for d in ids), 60)
        with trio.fail_after(90):
            for dev in devs:
                await dev.wait_state(
                    lambda s: s.installed_version == "2.0.0" and s.trial is None, timeout=90
                )
        await _until(
            lambda: all(
                r[0] == "accepted" and r[1] == "committed"
                for r in rows.execute("SELECT state, result FROM push_targets")
            ),
            30,
        )
        after = _snapshot(rows)
        assert after["pushes"] == before["pushes"]  # none lost, none made again
        assert after["targets"] == before["targets"]  # same rows: re-offered, not re-created
        assert set(before["reports"]) <= set(after["reports"])  # acknowledged: kept
        assert len(after["reports"]) == len(set(after["reports"]))
        # The device's row says what it runs; its committed outcome is in the
        # history exactly once: re-sent reports are acknowledged, not
        # re-recorded, and B's event seqs come from the shared sequence
        # (cluster_bus.py), so none collides with one A used.
        for d in ids:
            row = rows.execute("SELECT version FROM devices WHERE device_id = ?", (d,)).fetchone()
            assert row[0] == "2.0.0"
            assert await trio.to_thread.run_sync(_committed_events, rows, d) == 1
        assert all(dev.status.read_text().split()[1] == "2.0.0" for dev in devs)
    finally:
        for dev in devs:
            await dev.stop_agents()
        for proc in (a, b):
            _stop(proc)
