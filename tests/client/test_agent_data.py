"""A real ``fleetpush agent`` with a real SQLite database and a real migration (issue 12, part 2).

The device runs tests/apps/plain_app under ``fleetpush agent``; its data is
``data/app.db`` (SQLite) and ``config.toml`` in the app root, listed in
``data_paths``; each release ships tests/support/fp_data.py's ``migrate.py``
and the agent runs it as ``migrate_command``. Releases are published with
schema claims through the library ``publish_release`` the CLI uses, served
by a real releaser, pushed by an operator; the database is compared by
content (an SQL dump), every other file byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import trio
from fleet_helpers import read_status
from fleetpush.client import schema
from fleetpush.client.child_record import proc_start_time
from fleetpush.client.layout import StateLayout
from fp_agent import AgentDevice
from fp_data import MIGRATE_SRC, add_row, dump, make_db
from fp_releaser import publish_and_approve, push, releaser
from fp_trees import app_release, tree_digests

DB = "data/app.db"


def data_release(tmp: Path, version: str, migrate: str = "ok", behavior: str = "ok") -> Path:
    src = app_release(tmp, "plain_app", version, behavior)
    (src / "migrate.py").write_text(MIGRATE_SRC)
    (src / "migrate.txt").write_text(migrate + "\n")
    return src


class DataDevice(AgentDevice):
    """dev-1 on 1.0.0 with a database and a config file as its data."""

    def __init__(self, tmp_path: Path, port: int, **settings: object) -> None:
        defaults: dict[str, object] = dict(
            data_paths=[DB, "config.toml"],
            migrate_command=[sys.executable, "migrate.py"],
            migrate_timeout=30,
        )
        super().__init__(tmp_path, port, **{**defaults, **settings})
        make_db(self.app_root / DB).close()
        (self.app_root / "config.toml").write_text("port = 8080\n")

    def code(self) -> dict[str, str]:
        """Every file of the app root but the database (compared by content instead)."""
        return {k: v for k, v in tree_digests(self.app_root).items() if k != DB}

    def record(self) -> schema.SchemaRecord:
        return schema.read_record(StateLayout.of(self.state_dir))


@pytest.fixture
def agent_log(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    log = tmp_path / "device" / "agent.log"
    if log.exists():
        print(log.read_text()[-8000:])


async def on_v2(dev: DataDevice, handle: object, tmp_path: Path) -> int:
    """Start the agent, update it to 2.0.0 (schema 1): returns the app's pid on 2.0.0."""
    await dev.start_agent()
    await dev.wait_owner()
    await push(handle, "2.0.0")  # type: ignore[arg-type]
    await dev.wait_state(lambda s: s.installed_version == "2.0.0" and s.trial is None)
    _, _, pid = await read_status(dev.status, "2.0.0")
    assert dev.record() == schema.SchemaRecord(schema=1, version="2.0.0")
    return pid


@pytest.mark.slow
async def test_a_failed_migration_puts_code_and_data_back_and_runs_v2(
    tmp_path: Path, agent_log: None
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(120):
        async with releaser(data, heartbeat=5.0) as handle:
            v2 = data_release(tmp_path, "2.0.0")
            await publish_and_approve(handle, data, v2, "2.0.0", schema_version=1)
            v3 = data_release(tmp_path, "3.0.0", migrate="fail")
            await publish_and_approve(handle, data, v3, "3.0.0", schema_version=2, min_schema=1)
            dev = DataDevice(tmp_path, handle.port)
            try:
                old_pid = await on_v2(dev, handle, tmp_path)
                add_row(dev.app_root / DB, "written on 2.0.0")
                code, db = dev.code(), dump(dev.app_root / DB)
                await push(handle, "3.0.0")
                s = await dev.wait_state(
                    lambda s: s.is_bad("3.0.0") and "error" in (s.last_result or {})
                )
                # The migration's last stderr line reaches the history (and the releaser).
                assert s.installed_version == "2.0.0" and s.trial is None
                assert s.last_result is not None
                assert "error: column s2 cannot be filled" in s.last_result["error"]
                assert "2.0.0 and its data restored" in s.last_result["error"]
                # 2.0.0 runs again (a new process: it was stopped for the apply) ...
                _, _, pid = await read_status(dev.status, "2.0.0", not_pid=old_pid)
                assert (await dev.wait_owner())["pid"] == pid
                # ... on its own code and its own data, the half-made migration undone.
                assert dev.code() == code
                assert dump(dev.app_root / DB) == db
                assert dev.record() == schema.SchemaRecord(schema=1, version="2.0.0")
                log = dev.log.read_text()
                assert "update migrating 3.0.0" in log  # the progress state, reported
                assert "migration of the data from schema 1 to 2 failed" in log
            finally:
                await dev.stop_agents()


@pytest.mark.slow
async def test_newer_data_refuses_before_the_app_stops_and_rollback_restores_data(
    tmp_path: Path, agent_log: None
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(150):
        async with releaser(data, heartbeat=5.0) as handle:
            await publish_and_approve(
                handle, data, data_release(tmp_path, "2.0.0"), "2.0.0", schema_version=1
            )
            await publish_and_approve(
                handle, data, data_release(tmp_path, "3.0.0"), "3.0.0",
                schema_version=2, min_schema=1,
            )  # fmt: skip
            # Published later (a fix of the 2.x line), writing schema 1: not on schema 2 data.
            await publish_and_approve(
                handle, data, data_release(tmp_path, "2.5.0"), "2.5.0", schema_version=1
            )
            dev = DataDevice(tmp_path, handle.port)
            try:
                await on_v2(dev, handle, tmp_path)
                db_v2 = dump(dev.app_root / DB)
                await push(handle, "3.0.0")
                await dev.wait_state(lambda s: s.installed_version == "3.0.0" and s.trial is None)
                _, _, pid = await read_status(dev.status, "3.0.0")
                assert "s2 TEXT" in dump(dev.app_root / DB)
                assert dev.record() == schema.SchemaRecord(schema=2, version="3.0.0")
                add_row(dev.app_root / DB, "written on 3.0.0")

                await push(handle, "2.5.0")
                s = await dev.wait_state(
                    lambda s: s.is_bad("2.5.0") and "error" in (s.last_result or {})
                )
                assert s.last_result is not None and s.last_result["error"] == (
                    "data schema 2 is newer than what 2.5.0 supports (≤ 1): install 3.0.0 or later"
                )
                # Refused before anything stopped: the same app process runs on.
                assert s.installed_version == "3.0.0"
                assert (await dev.wait_owner())["pid"] == pid
                assert proc_start_time(pid) is not None
                assert dev.app_pid() == pid

                # Rolling back across the migration puts the data back too, and says so.
                ran = await dev.cli("update", "--rollback", "--json")
                assert ran.code == 0, ran.err
                doc = ran.json()
                assert (doc["rolled_back"], doc["installed"]) == ("3.0.0", "2.0.0")
                assert doc["data_restored"] is True and doc["data_backup_time"]
                text = await dev.cli("status", "--json")
                assert json.loads(text.out)["installed"] == "2.0.0"
                _, _, new_pid = await read_status(dev.status, "2.0.0", not_pid=pid)
                assert dump(dev.app_root / DB) == db_v2
                assert dev.record() == schema.SchemaRecord(schema=1, version="2.0.0")
                assert proc_start_time(new_pid) is not None
            finally:
                await dev.stop_agents()


@pytest.mark.slow
async def test_kill9_of_the_agent_mid_migration_lands_on_one_version_and_its_data(
    tmp_path: Path, agent_log: None
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(150):
        async with releaser(data, heartbeat=5.0) as handle:
            await publish_and_approve(
                handle, data, data_release(tmp_path, "2.0.0"), "2.0.0", schema_version=1
            )
            # Its first migration changes the data, then hangs: the agent is killed there.
            await publish_and_approve(
                handle, data, data_release(tmp_path, "3.0.0", migrate="slow"), "3.0.0",
                schema_version=2, min_schema=1,
            )  # fmt: skip
            dev = DataDevice(tmp_path, handle.port)
            try:
                await on_v2(dev, handle, tmp_path)
                first = dev.procs[0]
                await push(handle, "3.0.0")
                pid_file = dev.app_root / "migrate.pid"
                with trio.fail_after(30):
                    while not (pid_file.exists() and pid_file.read_text()):
                        await trio.sleep(0.05)
                migration = int(pid_file.read_text())
                assert "s2 TEXT" in dump(dev.app_root / DB)  # half way: changed, not done
                first.send_signal(signal.SIGKILL)
                await first.wait()
                # The migration dies with the agent (parent-death signal): nothing
                # writes to the data while the next agent restores it.
                with trio.fail_after(10):
                    while proc_start_time(migration) is not None:
                        await trio.sleep(0.05)

                await dev.start_agent()
                # Recovery puts 2.0.0 and its data back; the staged 3.0.0 is applied
                # again and migrates from schema 1 (on the half-migrated data its
                # ALTER TABLE would fail: duplicate column s2).
                s = await dev.wait_state(
                    lambda s: s.installed_version == "3.0.0" and s.trial is None, timeout=60
                )
                assert not s.is_bad("3.0.0")
                assert "recovered an interrupted apply: undone" in dev.log.read_text()
                _, _, pid = await read_status(dev.status, "3.0.0")
                assert (await dev.wait_owner())["pid"] == pid
                # 2.0.0's first migration (from an unknown schema), then 3.0.0's, once.
                migrations = (dev.app_root / "migrate.log").read_text().splitlines()
                assert migrations == ["migrated - 1 2.0.0", "migrated 1 2 3.0.0"]
                db = dump(dev.app_root / DB)
                assert "s2 TEXT" in db and db.endswith("-- user_version 2")
                assert dev.record() == schema.SchemaRecord(schema=2, version="3.0.0")
                assert not StateLayout.of(dev.state_dir).journal.exists()
                assert os.path.exists(dev.app_root / "app.py")
            finally:
                await dev.stop_agents()


@pytest.mark.slow
async def test_a_migrated_version_that_fails_its_trial_is_rolled_back_with_its_data(
    tmp_path: Path, agent_log: None
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(120):
        async with releaser(data, heartbeat=5.0) as handle:
            await publish_and_approve(
                handle, data, data_release(tmp_path, "2.0.0"), "2.0.0", schema_version=1
            )
            # Migrates fine, then the app crashes on start: the trial rolls it back.
            v3 = data_release(tmp_path, "3.0.0", behavior="crash")
            await publish_and_approve(handle, data, v3, "3.0.0", schema_version=2, min_schema=1)
            dev = DataDevice(tmp_path, handle.port)
            try:
                await on_v2(dev, handle, tmp_path)
                code, db = dev.code(), dump(dev.app_root / DB)
                await push(handle, "3.0.0")
                s = await dev.wait_state(
                    lambda s: s.is_bad("3.0.0") and s.installed_version == "2.0.0"
                )
                assert "update migrating 3.0.0" in dev.log.read_text()
                assert s.last_result is not None and s.last_result["state"] == "rolled-back"
                assert "data restored from backup of" in s.last_result["error"]
                await read_status(dev.status, "2.0.0")
                migrations = (dev.app_root / "migrate.log").read_text().splitlines()
                assert migrations[-1] == "migrated 1 2 3.0.0"  # it did migrate ...
                (dev.app_root / "migrate.log").unlink()  # (its log: not code, not data)
                assert {k: v for k, v in dev.code().items() if k != "migrate.log"} == {
                    k: v for k, v in code.items() if k != "migrate.log"
                }
                assert dump(dev.app_root / DB) == db  # ... and its data is undone
                assert dev.record() == schema.SchemaRecord(schema=1, version="2.0.0")
            finally:
                await dev.stop_agents()
