"""A deployment and the event feed across two releasers on one PostgreSQL (issue 15, part 2).

Two real releasers in one trio run, a real ``fleetpush agent`` on each. The
deployment is created through B, which does not lead: A (the leader) drives
it, starting d1 on itself and d2 through the bus on B, and sees d2's outcome
as a remote event. A watcher on A sees d2's reports; A's event pages walk
every row of both releasers' interleaved seq blocks once.
"""

from __future__ import annotations

from pathlib import Path

import trio
from cluster_helpers import two_releasers, until
from fleetpush.protocol.messages import DeployCreate, Event, EventFilter
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve
from fp_trees import app_release

from fleetpush.operator import connect as operator_connect


def _runs(dev: AgentDevice) -> str | None:
    try:
        return dev.status.read_text().split()[1]
    except (OSError, IndexError):
        return None


async def _watch(port: int, seen: list[Event], *, task_status: trio.TaskStatus[None]) -> None:
    async with operator_connect(("127.0.0.1", port), OPERATOR_KEY, name="watcher") as op:
        events = op.watch()
        task_status.started()
        async for event in events:
            seen.append(event)


async def test_a_deployment_created_on_b_completes_on_devices_of_a_and_b(
    tmp_path: Path, pg_url: str
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(150):
        async with two_releasers(data, pg_url) as (a, b), trio.open_nursery() as nursery:
            seen_on_a: list[Event] = []
            await nursery.start(_watch, a.port, seen_on_a)
            d1 = AgentDevice(tmp_path / "d1", a.port, device_id="d1")
            d2 = AgentDevice(tmp_path / "d2", b.port, device_id="d2")
            try:
                for dev in (d1, d2):
                    await dev.start_agent()
                for dev in (d1, d2):
                    await dev.wait_owner()
                await until(lambda: "d1" in a.services.fleet and "d2" in b.services.fleet)
                await until(lambda: a.services.cluster and a.services.cluster.holder("d2"))
                await publish_and_approve(
                    a, data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0"
                )
                async with operator_connect(("127.0.0.1", b.port), OPERATOR_KEY) as op:
                    create = DeployCreate(app="demo", version="2.0.0", all=True)
                    info = await op.deploy_create(create)
                    with trio.fail_after(90):
                        while (info := await op.deploy_show(info.deployment_id)).state != (
                            "completed"
                        ):
                            await trio.sleep(0.3)
                assert info.counts == {"succeeded": 2}, info
                assert sorted(d.device_id for d in info.devices) == ["d1", "d2"]
                assert _runs(d1) == "2.0.0" and _runs(d2) == "2.0.0"
                # B's device reports reached A's watcher (as remote events).
                await until(
                    lambda: any(e.device_id == "d2" and e.kind == "progress" for e in seen_on_a)
                )
            finally:
                for dev in (d1, d2):
                    await dev.stop_agents()
            nursery.cancel_scope.cancel()

        # Both releasers wrote events, from their own seq blocks: unique seqs.
        hub = a.services.events
        stored = [e.seq for e in hub.history(100_000)]
        assert len(stored) == len(set(stored))
        # A page walk by cursor yields every stored row once, in seq order.
        walked: list[int] = []
        before = None
        while True:
            page = hub.query(EventFilter(limit=7, before=before))
            walked += [e.seq for e in page.events]
            if page.next is None:
                break
            before = page.next
        assert walked == sorted(stored, reverse=True)
