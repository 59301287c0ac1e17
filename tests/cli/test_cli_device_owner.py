"""Device commands beside a running agent go through it (issue 11, "One owner").

A real releaser on 127.0.0.1, a real ``fleetpush agent`` running the plain app
(it writes ``PORT VERSION PID``), and the real ``fleetpush`` entry point.
Before issue 11, ``status`` opened a second releaser session with the agent's
device id (the releaser dropped the agent, which reconnected), ``update
--rollback`` replaced files under the running app, and ``update --to``
installed a release marked bad and started a second app in the shell.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import trio
from fleetpush.client.layout import StateLayout
from fp_agent import AgentDevice
from fp_releaser import publish, publish_and_approve, releaser
from fp_trees import app_release


def _session_events(data_dir: Path) -> list[tuple[str, str]]:
    """The releaser's connected/disconnected events of dev-1, in order."""
    db = sqlite3.connect(data_dir / "fleetpush.db")
    try:
        rows = db.execute(
            "SELECT kind, data FROM events WHERE device_id = 'dev-1' "
            "AND kind IN ('connected', 'disconnected') ORDER BY seq"
        ).fetchall()
    finally:
        db.close()
    return [(str(k), str(d)) for k, d in rows]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _new_app(dev: AgentDevice, version: str, old_pid: int) -> int:
    """The pid of the app the agent started in place of ``old_pid``, running ``version``."""
    with trio.fail_after(30):
        while True:
            try:
                _port, v, pid = dev.status.read_text().split()
                if v == version and int(pid) != old_pid:
                    return int(pid)
            except (FileNotFoundError, ValueError):
                pass
            await trio.sleep(0.05)


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-8000:])


@pytest.mark.slow
async def test_status_100_times_leaves_the_agent_session_up_and_changes_nothing(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(150):
        data = tmp_path / "data"
        async with releaser(data, heartbeat=5.0) as handle:
            # An update waits on the releaser: a reconnecting agent would take it.
            await publish_and_approve(
                handle, data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0"
            )
            dev = AgentDevice(tmp_path, handle.port)
            agent = await dev.start_agent()
            try:
                with trio.fail_after(20):
                    while (doc := await dev.wait_owner())["connection"] != "connected":
                        await trio.sleep(0.1)
                await dev.wait_state(lambda s: s.history == ())
                await trio.sleep(1.0)  # the first app_status and history flush are done
                connects = doc["connects"]
                events = _session_events(data)
                state_file = StateLayout.of(dev.state_dir).state_file
                before = state_file.read_bytes()
                app_pid = dev.app_pid()
                # One through the installed script, the rest through the same entry point
                # in-process (a hundred interpreter starts would only test the machine).
                first = await dev.cli("status", "--json")
                assert first.code == 0, first
                for _ in range(99):
                    ran = await dev.cli_inline("status", "--json")
                    assert ran.code == 0, ran
                    doc = ran.json()
                    assert doc["installed"] == "1.0.0" and doc["owner_pid"] == agent.pid
                    assert doc["connection"] == "connected"
                ran = await dev.cli_inline("status")  # the text form too
                assert ran.code == 0 and "control_socket" in ran.out, ran
                assert doc["connects"] == connects
                assert _session_events(data) == events  # no disconnect, no reconnect
                assert state_file.read_bytes() == before
                assert dev.app_pid() == app_pid and agent.returncode is None
                assert dev.state().installed_version == "1.0.0"
                # status --check asks through the agent's own session, still no reconnect
                ran = await dev.cli("status", "--check", "--json")
                assert ran.code == 0, ran
                assert ran.json()["newest"] == "2.0.0"
                assert _session_events(data) == events
            finally:
                await dev.stop_agents()


@pytest.mark.slow
async def test_update_rollback_and_app_restart_go_through_the_agent(
    tmp_path: Path, agent_log: None
) -> None:
    with trio.fail_after(150):
        data = tmp_path / "data"
        async with releaser(data, heartbeat=5.0) as handle:
            await publish_and_approve(
                handle, data, app_release(tmp_path, "plain_app", "2.0.0"), "2.0.0"
            )
            publish(data, app_release(tmp_path, "plain_app", "3.0.0"), "3.0.0")  # a draft
            dev = AgentDevice(tmp_path, handle.port)
            agent = await dev.start_agent()
            try:
                await dev.wait_owner()
                pid1 = await _new_app(dev, "1.0.0", 0)
                # update --to: the agent stops its app, installs, starts the new one
                ran = await dev.cli("update", "--to", "2.0.0", "--json")
                assert ran.code == 0, ran
                assert ran.json()["installed"] == "2.0.0" and ran.json()["updated"] is True
                pid2 = await _new_app(dev, "2.0.0", pid1)
                assert not _alive(pid1)
                # app restart: same supervisor, a new child
                ran = await dev.cli("app", "restart", "--json")
                assert ran.code == 0 and ran.json()["app_state"] == "running", ran
                pid3 = await _new_app(dev, "2.0.0", pid2)
                assert not _alive(pid2) and ran.json()["pid"] == pid3
                # update --rollback: between stop and start, never under the running app
                ran = await dev.cli("update", "--rollback", "--json")
                assert ran.code == 0, ran
                # No schema change to undo (issue 12): the data is kept, and it says so.
                assert ran.json() == {
                    "rolled_back": "2.0.0",
                    "installed": "1.0.0",
                    "data_restored": False,
                    "data_backup_time": None,
                }
                pid4 = await _new_app(dev, "1.0.0", pid3)
                assert not _alive(pid3) and _alive(pid4)
                assert "2.0.0" in dev.state().bad_releases
                # --to a release marked bad here: refused without --force, one sentence
                ran = await dev.cli("update", "--to", "2.0.0")
                assert ran.code == 6, ran
                assert "marked bad" in ran.err and "--force" in ran.err
                assert len(ran.err.strip().splitlines()) == 1
                # --to a release the releaser does not offer this device (a draft): 6 too
                ran = await dev.cli("update", "--to", "3.0.0")
                assert ran.code == 6, ran
                assert dev.app_pid() == pid4 and dev.state().installed_version == "1.0.0"
                # with --force it is installed, by the agent
                ran = await dev.cli("update", "--to", "2.0.0", "--force", "--json")
                assert ran.code == 0, ran
                await _new_app(dev, "2.0.0", pid4)
                status = (await dev.cli("status", "--json")).json()
                assert status["owner_pid"] == agent.pid and status["installed"] == "2.0.0"
                assert agent.returncode is None
                # one app, the agent's own child: the pids it reported are all gone but one
                assert [p for p in (pid1, pid2, pid3, pid4) if _alive(p)] == []
            finally:
                await dev.stop_agents()
            # without an agent, the same refusal, acting directly (holding the lock)
            ran = await dev.cli("update", "--to", "2.0.0", "--no-start")
            assert ran.code in (0, 10), ran  # 2.0.0 is installed: nothing to refuse
            await dev.cli("update", "--rollback")
            ran = await dev.cli("update", "--to", "2.0.0", "--no-start")
            assert ran.code == 6 and "--force" in ran.err, ran
