"""A push made through one releaser reaches a device connected to another (issue 15, part 2).

Two real releasers (fleetpush.server.serve) in one trio run, one PostgreSQL
(tests/support/fp_pg.py), one data dir; a real ``fleetpush agent`` connected
to B only. Marked ``postgres`` by the pg_url fixture.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from cluster_helpers import two_releasers, until
from fleetpush.protocol import FleetpushError
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY
from fp_releaser import publish_and_approve, push
from fp_trees import app_release

from fleetpush.operator import connect as operator_connect


def _runs(dev: AgentDevice) -> str | None:
    try:
        return dev.status.read_text().split()[1]
    except (OSError, IndexError):
        return None


async def test_a_push_through_a_installs_on_a_device_connected_to_b(
    tmp_path: Path, pg_url: str
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(120):
        async with two_releasers(data, pg_url) as (a, b):
            assert a.services.cluster is not None and b.services.cluster is not None
            assert a.services.cluster.leader and not b.services.cluster.leader
            dev = AgentDevice(tmp_path / "d1", b.port, device_id="d1")
            await dev.start_agent()
            try:
                await dev.wait_owner()
                await until(lambda: "d1" in b.services.fleet)
                # B's "connected" event reached A: A counts d1 online (on B).
                await until(lambda: a.services.cluster.holder("d1"))
                assert "d1" not in a.services.fleet
                # What needs the live link is forwarded by A to B (cluster_calls.py);
                # only following logs is refused, naming the releaser that has it.
                assert b.services.cluster.releaser_id == b.services.releaser_id
                holder = f"127.0.0.1:{b.port}"  # its address in the releasers row
                async with operator_connect(("127.0.0.1", a.port), OPERATOR_KEY) as op:
                    (outcome,) = await op.app_control("restart", ["d1"])
                    assert outcome.ok, outcome.error
                    assert outcome.status is not None and outcome.status.state == "running"
                    assert isinstance(await op.app_logs("d1"), list)
                    with pytest.raises(FleetpushError) as refused:
                        async with aclosing(op.follow_logs("d1", 3)) as follow:
                            async for _ in follow:
                                break
                    assert f"device d1: connected to releaser {holder}" in str(refused.value)
                    assert f"--server {holder}" in str(refused.value)
                await publish_and_approve(
                    a, data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0"
                )
                await push(a, "2.0.0", devices=["d1"])
                await until(lambda: _runs(dev) == "2.0.0", timeout=60)
                # ...and B's reports came back to A's event hub.
                await until(
                    lambda: any(
                        e.device_id == "d1" and e.data.get("state") == "committed"
                        for e in a.services.events.history(1000)
                    )
                )
            finally:
                await dev.stop_agents()
