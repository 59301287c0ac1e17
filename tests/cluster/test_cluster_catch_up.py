"""A notification that never arrives is made up for from the rows (issue 15, part 2).

Two real releasers in one trio run on one PostgreSQL, a real agent on B.
Nobody's notifications are sent (as if lost) and the periodic safety net is
set far away, so the push made through A stays queued for d1; then B's bus
connection is killed by PostgreSQL (``pg_terminate_backend``): B reconnects,
reads the queued targets from the rows, and d1 installs the release.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trio
from cluster_helpers import two_releasers, until
from fleetpush.server import cluster_bus, cluster_rows
from fp_agent import AgentDevice
from fp_releaser import publish_and_approve, push
from fp_trees import app_release


def _target_state(pg_url: str, device_id: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT state FROM push_targets WHERE device_id = %s ORDER BY id DESC LIMIT 1",
            (device_id,),
        ).fetchone()
    assert row is not None
    return str(row[0])


async def test_a_lost_notification_is_caught_up_after_the_bus_reconnects(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_bus, "CATCH_UP_INTERVAL", 3600.0)
    data = tmp_path / "data"
    with trio.fail_after(120):
        async with two_releasers(data, pg_url) as (a, b):
            assert b.services.cluster is not None
            dev = AgentDevice(tmp_path / "d1", b.port, device_id="d1")
            await dev.start_agent()
            try:
                await dev.wait_owner()
                await until(lambda: "d1" in b.services.fleet)
                await publish_and_approve(
                    a, data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0"
                )
                monkeypatch.setattr(cluster_rows, "send_notify", lambda conn, payload: None)
                await push(a, "2.0.0", devices=["d1"])
                await trio.sleep(1.0)
                assert _target_state(pg_url, "d1") == "queued"  # nothing told B

                pid = b.services.cluster.link.backend_pid
                assert pid is not None
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await until(lambda: dev.status.read_text().split()[1] == "2.0.0", timeout=60)
                assert b.services.cluster.link.backend_pid not in (None, pid)
            finally:
                await dev.stop_agents()
