"""The leader dies, the other releaser drives the open deployment (issue 15, part 2).

Two real ``fleetpush server`` processes on one PostgreSQL and one data dir,
and a real ``fleetpush agent``. The leader is found from PostgreSQL itself
(who holds the leader lock: its bus connection's application_name names
the process) and killed with SIGKILL while a deployment waits for d1, which
is offline; d1 then connects to the survivor, which must have taken the lead
and start it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import trio
from fleetpush.protocol.messages import DeployCreate
from fleetpush.server.cluster_bus import LEADER_KEY
from fp_agent import AgentDevice
from fp_keys import OPERATOR_KEY, key_hex
from fp_releaser import publish, start_releaser_process
from fp_trees import app_release

from fleetpush.operator import connect as operator_connect


def _start(data: Path, pg_url: str) -> tuple[subprocess.Popen[str], int]:
    return start_releaser_process(
        "--data-dir", str(data), "--listen", "127.0.0.1:0", "--database", pg_url,
        "--operator-key", key_hex(OPERATOR_KEY), "--insecure",
    )  # fmt: skip


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _leader_pid(pg_url: str) -> int | None:
    """The process id of the releaser holding the leader lock, or None."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted",
            (LEADER_KEY,),
        ).fetchone()
    if row is None:
        return None
    # "fleetpush-bus HOST-PID-TOKEN"
    return int(str(row[0]).rsplit("-", 2)[1])


async def _until_leader(pg_url: str, pids: set[int]) -> int:
    with trio.fail_after(30):
        while (pid := await trio.to_thread.run_sync(_leader_pid, pg_url)) not in pids:
            await trio.sleep(0.2)
    assert pid is not None
    return pid


async def test_kill9_of_the_leader_hands_the_open_deployment_to_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    data = tmp_path / "data"
    procs = dict([_start(data, pg_url), _start(data, pg_url)])  # {Popen: port}
    by_pid = {p.pid: (p, port) for p, port in procs.items()}
    try:
        with trio.fail_after(180):
            leader_pid = await _until_leader(pg_url, set(by_pid))
            leader, leader_port = by_pid[leader_pid]
            ((survivor, survivor_port),) = [v for k, v in by_pid.items() if k != leader_pid]

            # d1 registers through the survivor, then goes offline.
            dev = AgentDevice(tmp_path / "d1", survivor_port, device_id="d1")
            await dev.start_agent()
            await dev.wait_owner(timeout=60)
            await dev.stop_agents()
            dev.procs.clear()

            publish(data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0")
            async with operator_connect(("127.0.0.1", leader_port), OPERATOR_KEY) as op:
                await op.approve("demo", "2.0.0")
                info = await op.deploy_create(DeployCreate(app="demo", version="2.0.0", all=True))
            deployment_id = info.deployment_id

            _stop(leader)  # SIGKILL: its bus connection closes, the lock is free
            assert await _until_leader(pg_url, {survivor.pid}) == survivor.pid

            await dev.start_agent()
            try:
                async with operator_connect(("127.0.0.1", survivor_port), OPERATOR_KEY) as op:
                    with trio.fail_after(90):
                        while (info := await op.deploy_show(deployment_id)).state != "completed":
                            await trio.sleep(0.3)
                assert info.counts == {"succeeded": 1}, info
                assert dev.status.read_text().split()[1] == "2.0.0"
            finally:
                await dev.stop_agents()
    finally:
        for proc in procs:
            _stop(proc)
