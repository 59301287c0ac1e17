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
from typing import Any

import pytest
import trio
from fleetpush.client.download import capabilities
from fleetpush.protocol import PROTOCOL_VERSION
from fleetpush.protocol.keys import public_bytes
from fleetpush.protocol.messages import (
    DeployCreate,
    GetManifest,
    Hello,
    Outcome,
    ReportOutcomes,
    UpdateProgress,
)
from fleetpush.server import pg
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser
from server_helpers import publish

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

            # The handshake and the connection's start are behind us once a
            # first round trip is answered.
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


async def test_deployments_enrolment_releases_and_manifests_leave_the_trio_thread(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment created, paused, resumed and aborted; another created and
    completed by the scheduler; an enrolment change, a release status change,
    the release list and a device fetching a manifest: no statement on the
    trio thread.

    The completed deployment's one device already runs the release (it is
    skipped, so nothing is pushed): a device the scheduler starts is pushed
    through push_core.deliver_push, whose transaction is still on the trio
    thread (specs/SCALE.md §4.1).
    """
    monkeypatch.setenv("FLEETPUSH_DATABASE", pg_url)  # publish's store: the releaser's
    data = tmp_path / "data"
    publish(data, tmp_path / "src2", "2.0", approved=True)
    publish(data, tmp_path / "src3", "3.0")

    def hello(device_id: str, version: str) -> tuple[Any, Hello]:
        key = generate_private_key()
        return key, Hello(
            protocol_version=PROTOCOL_VERSION, role="device", peer_id=device_id,
            public_key=public_bytes(key), app="demo", version=version, channel="stable",
            capabilities=capabilities(),
        )  # fmt: skip

    key1, hello1 = hello("dev-1", "2.0")
    key2, hello2 = hello("dev-2", "1.0")
    with trio.fail_after(90):
        async with releaser(data, database=pg_url, database_pool=2) as handle:
            addr = ("127.0.0.1", handle.port)
            async with dial(addr, key2, hello2, timeout=10.0) as link2:
                await link2.peer.request(
                    "report_outcomes", ReportOutcomes(reports=[]), timeout=10.0
                )
            async with (
                dial(addr, key1, hello1, timeout=10.0) as link1,
                operator_connect(addr, OPERATOR_KEY, name="ops") as op,
            ):
                conn = handle.services.conn
                assert isinstance(conn, pg.PgConnection)
                # The handshakes, and dev-2's disconnect, are behind us once
                # the device list shows both (it flushes the write-behind).
                with trio.fail_after(15):
                    while {d.device_id for d in await op.list_devices() if d.connected} != {
                        "dev-1"
                    }:
                        await trio.sleep(0.05)
                await link1.peer.request(
                    "report_outcomes", ReportOutcomes(reports=[]), timeout=10.0
                )
                before = conn.loop_calls

                got = await link1.peer.request(
                    "get_manifest", GetManifest(app="demo", version="2.0"), timeout=10.0
                )
                rejected = await op.set_enrollment("dev-2", "rejected")
                accepted = await op.set_enrollment("dev-2", "accepted")
                status = await op.set_release_status("demo", "3.0", "pre-released")
                listed = await op.list_releases(app="demo")

                offline = await op.deploy_create(
                    DeployCreate(app="demo", version="2.0", devices=["dev-2"])
                )
                paused = await op.deploy_pause(offline.deployment_id)
                resumed = await op.deploy_resume(offline.deployment_id)
                aborted = await op.deploy_abort(offline.deployment_id)

                done = await op.deploy_create(
                    DeployCreate(app="demo", version="2.0", devices=["dev-1"])
                )
                with trio.fail_after(15):
                    while (shown := await op.deploy_show(done.deployment_id)).state != "completed":
                        await trio.sleep(0.05)
                events = await op.list_events()
                assert conn.loop_calls == before
    assert got.status == "approved"
    assert (rejected.enrollment, accepted.enrollment) == ("rejected", "accepted")
    assert status.status == "pre-released"
    assert [(r.version, r.status) for r in listed] == [
        ("2.0", "approved"),
        ("3.0", "pre-released"),
    ]
    assert (offline.state, paused.state, resumed.state, aborted.state) == (
        "running", "paused", "running", "aborted",
    )  # fmt: skip
    assert shown.state == "completed"
    actions = [e.data.get("action") for e in events if e.kind == "deployment"]
    assert actions.count("created") == 2
    assert {"paused", "resumed", "aborted", "completed"} <= set(actions)
    assert {e.kind for e in events} >= {"enrollment", "release_status"}
