"""Issue 13, part 3: remote app control and logs. A real releaser on 127.0.0.1,
a real `fleetpush agent` supervising a real app that prints a line every
50 ms, an embedded updater beside it, and the operator client and the real
`fleetpush app` / `fleetpush logs` commands."""

from __future__ import annotations

import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from fleetpush.client.app_remote import NO_SUPERVISOR
from fleetpush.client.updater import Updater
from fleetpush.protocol.keys import private_key_to_pem
from fp_agent import FLEETPUSH, AgentDevice
from fp_devices import device_config
from fp_keys import OPERATOR_KEY
from fp_releaser import releaser

from fleetpush.operator import OperatorClient
from fleetpush.operator import connect as operator_connect

pytestmark = pytest.mark.slow

TICKER = [
    sys.executable, "-u", "-c",
    "import itertools, time\n"
    "for i in itertools.count():\n"
    "    print(f'tick {i}', flush=True)\n"
    "    time.sleep(0.05)\n",
]


async def wait_connected(op: OperatorClient, *ids: str) -> None:
    with trio.fail_after(30):
        while {d.device_id for d in await op.list_devices() if d.connected} < set(ids):
            await trio.sleep(0.1)


async def test_operator_controls_the_agents_app_and_reads_its_logs(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with releaser(tmp_path / "data") as handle:
            device = AgentDevice(tmp_path, handle.port)
            await device.start_agent(TICKER)
            embedded = Updater(device_config(tmp_path / "embedded", handle.port,
                                             device_id="dev-2"))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(embedded.session.run)
                    async with operator_connect(
                        ("127.0.0.1", handle.port), OPERATOR_KEY, name="ops"
                    ) as op:
                        await wait_connected(op, "dev-1", "dev-2")
                        await _logs(op)
                        await _control(op, device)
                        [refused] = await op.app_control("restart", ["dev-2"])
                        assert not refused.ok and refused.error == NO_SUPERVISOR
                        ghost, = await op.app_control("stop", ["nobody"])
                        assert (ghost.ok, ghost.error) == (False, "no such device")
                    # The follower left with the operator: the releaser forgets it.
                    with trio.fail_after(10):
                        while handle.services.app_logs.followed("dev-1"):
                            await trio.sleep(0.05)
                    await _cli(handle.port, tmp_path)
                    nursery.cancel_scope.cancel()
            finally:
                await device.stop_agents()
            # Audited with the operator's name.
            async with operator_connect(("127.0.0.1", handle.port), OPERATOR_KEY) as op:
                audit = await op.list_events(kinds=["app_control"])
            # The operator as the releaser names it: "name (key id)".
            actions = [
                (e.device_id, e.data["action"], e.data["ok"], e.data["operator"].split()[0])
                for e in audit
            ]
            assert ("dev-1", "restart", True, "ops") in actions
            assert ("dev-2", "restart", False, "ops") in actions


async def _logs(op: OperatorClient) -> None:
    with trio.fail_after(20):
        while len(await op.app_logs("dev-1", 5)) < 5:
            await trio.sleep(0.1)
    tail = await op.app_logs("dev-1", 5)
    assert len(tail) == 5 and all(line.startswith("tick ") for line in tail)
    numbers = [int(line.split()[1]) for line in tail]
    assert numbers == sorted(numbers) and numbers[-1] - numbers[0] == 4

    batches = []
    with trio.fail_after(20):
        async with aclosing(op.follow_logs("dev-1", 3)) as follow:
            async for batch in follow:
                batches.append(batch)
                if len(batches) == 4:
                    break
    first = [int(line.split()[1]) for line in batches[0].lines]
    later = [int(line.split()[1]) for b in batches[1:] for line in b.lines]
    assert len(first) == 3 and later and min(later) > max(first)  # new lines, in order
    assert later == sorted(later)


async def _control(op: OperatorClient, device: AgentDevice) -> None:
    [before] = await op.app_control("restart", ["dev-1"])
    assert before.ok and before.status is not None and before.status.state == "running"
    pid = before.status.pid
    [stopped] = await op.app_control("stop", ["dev-1"])
    assert stopped.ok and stopped.status is not None and stopped.status.state == "stopped"
    assert stopped.status.pid is None
    [started] = await op.app_control("start", ["dev-1"])
    assert started.ok and started.status is not None and started.status.state == "running"
    assert started.status.pid not in (None, pid)


async def _cli(port: int, tmp_path: Path) -> None:
    key = tmp_path / "operator.key"
    key.write_bytes(private_key_to_pem(OPERATOR_KEY))
    common = ["--server", f"127.0.0.1:{port}", "--insecure", "--operator-key", str(key)]
    done = await trio.run_process(
        [FLEETPUSH, "app", "restart", "dev-1", "dev-2", *common],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 1, out  # dev-2 could not: the command failed
    assert "dev-1: app running (pid " in out
    assert f"dev-2: could not restart the app: {NO_SUPERVISOR}" in out
    done = await trio.run_process(
        [FLEETPUSH, "logs", "dev-1", "--lines", "3", *common],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and len(lines) == 3, done.stderr
    assert all(line.startswith("tick ") for line in lines)
    done = await trio.run_process(
        [FLEETPUSH, "logs", "dev-1", "--lines", "5000", *common],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines()[-1] == (
        "fleetpush: --lines must be between 0 and 1000"
    )
