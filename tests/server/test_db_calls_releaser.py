"""The releaser's hot paths send no statement from the trio thread on PostgreSQL (issue 15).

A real releaser on a real PostgreSQL (tests/support/fp_pg.py) and a real
device link over TCP: once the device is connected, its progress and its
``report_outcomes``, and the operator's device list, device detail and event
list, run every statement in the runner's worker threads (server/db_calls.py).
``PgConnection.loop_calls`` counts statements sent on the trio thread's own
connection; a hot path moved back onto the trio thread would show here.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio
from fleetpush.client.download import capabilities
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import Hello, Outcome, ReportOutcomes, UpdateProgress
from fleetpush.server import pg
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser

from fleetpush.net.dial import dial
from fleetpush.net.keys import generate_private_key
from fleetpush.operator import connect as operator_connect


async def test_reports_and_operator_reads_leave_the_trio_thread(
    pg_url: str, tmp_path: Path
) -> None:
    key = generate_private_key()
    hello = Hello(
        protocol_version=PROTOCOL_VERSION, role="device", peer_id="dev-1",
        public_key=public_bytes(key), app="demo", version="1.0.0", channel="stable",
        capabilities=capabilities(),
    )
    with trio.fail_after(60):
        async with (
            releaser(tmp_path / "data", database=pg_url, database_pool=2) as handle,
            dial(("127.0.0.1", handle.port), key, hello, timeout=10.0) as link,
            operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY, name="ops") as op,
        ):
            conn = handle.services.conn
            assert isinstance(conn, pg.PgConnection)
            assert handle.services.calls.threaded

            async def report(n: int) -> list[str]:
                o = Outcome(report_id=f"r{n}", event="committed", time=time.time(),
                            state="committed", app="demo", version="2.0.0")
                result = await link.peer.request(
                    "report_outcomes", ReportOutcomes(reports=[o]), timeout=10.0
                )
                return list(result.acknowledged)

            # The handshake and the connection's start (the deployment
            # scheduler's wake-up still reads on the trio thread) are behind us
            # once a first round trip is answered.
            assert await report(0) == ["r0"]
            before = conn.loop_calls
            for n in range(1, 4):
                await link.peer.notify(
                    "update_progress",
                    UpdateProgress(state="downloading", app="demo", version="2.0.0",
                                   bytes_done=n, bytes_total=10),
                )
                assert await report(n) == [f"r{n}"]
            assert await report(1) == ["r1"]  # a re-sent report: acknowledged again
            devices = await op.list_devices()
            detail = await op.get_device("dev-1")
            events = await op.list_events(device_id="dev-1")
            assert conn.loop_calls == before
            rows = conn.execute("SELECT COUNT(*) FROM reports").fetchone()
            assert rows[0] == 4
    assert [d.device_id for d in devices] == ["dev-1"]
    assert detail.device.state == "committed"
    assert {e.kind for e in events} >= {"connected", "progress"}
