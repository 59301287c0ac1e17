"""The install engine with the app's data (issue 12, part 2): backups, schema, migrations.

Real files, a real SQLite database and a real migration script (tests/support/
fp_data.py) in a real subprocess; the engine is called directly, as the agent
does in its worker thread. The agent end to end is in test_agent_data.py.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from pathlib import Path

import pytest
from data_testlib import DB, SETTINGS, device, record, release, stage, without_db
from fleetpush.client import schema
from fleetpush.client.backup import list_backups
from fleetpush.client.data_settings import DataSettings, Retention
from fleetpush.client.install import (
    apply_staged,
    read_journal,
    rollback,
    schema_refusal,
)
from fleetpush.client.layout import StateLayout
from fleetpush.client.migrate import MigrationFailed
from fleetpush.client.state import load_state
from fp_data import add_row, dump, make_db
from install_testlib import snapshot

__all__ = ["device"]  # the fixture, shared with test_data_crash.py


def test_failed_migration_restores_code_and_data_byte_for_byte(device: tuple[Path, Path]) -> None:
    state, root = device
    before, db_before = snapshot(root), dump(root / DB)
    stage(state, "3.0", 3, release("3.0", "fail"), schema_version=2, min_schema=1)
    with pytest.raises(MigrationFailed) as e:
        apply_staged(state, root, "3.0", 200.0, data=SETTINGS)
    # The migrate command's last stderr line, and what was done about it.
    assert "error: column s2 cannot be filled" in str(e.value)
    assert "2.0 and its data restored" in str(e.value)
    assert dump(root / DB) == db_before  # the half-made migration is undone
    # Code and config byte for byte; the database by content (SQLite's backup
    # API writes its own header counters).
    assert without_db(snapshot(root)) == without_db(before)
    s = load_state(state)
    assert s.installed_version == "2.0" and s.trial is None
    assert s.is_bad("3.0") and s.staged is None  # not retried until pushed again
    assert read_journal(state) is None
    assert record(state) == schema.SchemaRecord(schema=1, version="2.0")


def test_migration_then_rollback_restores_the_data_and_its_schema(
    device: tuple[Path, Path],
) -> None:
    state, root = device
    db_before = dump(root / DB)
    stage(state, "3.0", 3, release("3.0"), schema_version=2, min_schema=1)
    apply_staged(state, root, "3.0", 200.0, data=SETTINGS)
    assert (root / "migrate.log").read_text() == "migrated 1 2 3.0\n"
    assert "s2 TEXT" in dump(root / DB)
    assert record(state) == schema.SchemaRecord(schema=2, version="3.0")
    add_row(root / DB, "written on 3.0")  # lost with the rollback: the schema goes back
    result = rollback(state, root, "by hand", now=300.0)
    assert result.version == "2.0" and result.data_restored == 200.0
    assert dump(root / DB) == db_before
    assert record(state) == schema.SchemaRecord(schema=1, version="2.0")
    assert "data restored from backup of" in str(load_state(state).last_result)


def test_rollback_without_a_schema_change_keeps_the_data(device: tuple[Path, Path]) -> None:
    state, root = device
    stage(state, "2.1", 3, release("2.1"), schema_version=1)
    apply_staged(state, root, "2.1", 200.0, data=SETTINGS)
    assert not (root / "migrate.log").exists()  # same schema: nothing to migrate
    add_row(root / DB, "written on 2.1")
    result = rollback(state, root, "by hand", now=300.0)
    assert result.version == "2.0" and result.data_restored is None
    assert "written on 2.1" in dump(root / DB)


def test_sqlite_is_backed_up_through_sqlite_not_as_raw_bytes(device: tuple[Path, Path]) -> None:
    """Rows committed into a WAL that was never checkpointed are in the backup."""
    state, root = device
    (root / DB).unlink()
    app = make_db(root / DB, rows=50, wal=True)  # the app still has it open
    try:
        assert (root / (DB + "-wal")).stat().st_size > 0
        stage(state, "2.1", 3, release("2.1"), schema_version=1)
        apply_staged(state, root, "2.1", 200.0, data=SETTINGS)
    finally:
        app.close()
    (name, info), *_ = list_backups(StateLayout.of(state))
    files = info.extra["data"]["files"]
    assert [(f["path"], f["kind"]) for f in files] == [(DB, "sqlite"), ("config.toml", "file")]
    copy = StateLayout.of(state).backup_dir(name) / files[0]["copy"]
    db = sqlite3.connect(copy)
    try:
        assert db.execute("SELECT count(*) FROM items").fetchone() == (50,)
    finally:
        db.close()


def test_a_release_older_than_the_data_is_refused_and_nothing_touched(
    device: tuple[Path, Path],
) -> None:
    state, root = device
    schema.write_record(StateLayout.of(state), schema.SchemaRecord(schema=5, version="4.0"))
    stage(state, "3.0", 3, release("3.0"), schema_version=4, min_schema=1)
    before = snapshot(root)
    reason = schema_refusal(state, "3.0")  # what the agent asks before it stops the app
    assert reason == "data schema 5 is newer than what 3.0 supports (≤ 4): install 4.0 or later"
    assert load_state(state).staged is not None  # it only reads
    with pytest.raises(schema.SchemaRefused, match=re.escape(reason)):
        apply_staged(state, root, "3.0", 200.0, data=SETTINGS)
    assert snapshot(root) == before
    assert not list_backups(StateLayout.of(state))[1:]  # only the first install's
    s = load_state(state)
    assert s.is_bad("3.0") and s.staged is None and s.installed_version == "2.0"


def test_apply_staged_itself_refuses_data_too_old_to_migrate(device: tuple[Path, Path]) -> None:
    state, root = device
    stage(state, "3.0", 3, release("3.0"), schema_version=4, min_schema=3)
    with pytest.raises(schema.SchemaRefused, match=r"data schema 1 is older than what 3\.0"):
        apply_staged(state, root, "3.0", 200.0, data=SETTINGS)
    assert read_journal(state) is None and load_state(state).installed_version == "2.0"


def test_retention_by_count_and_age_never_drops_the_rollback_backup(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "root"
    day = 86400.0
    stage(state, "1.0", 1, release("1.0"))
    apply_staged(state, root, "1.0", 0.0)
    keep = DataSettings(retention=Retention(keep=3, max_age=2 * day))
    for n in range(2, 8):  # one apply a day
        stage(state, f"{n}.0", n, release(f"{n}.0"))
        apply_staged(state, root, f"{n}.0", n * day, data=keep)
    names = [info.to_version for _n, info in list_backups(StateLayout.of(state))]
    # By count the newest 3 (to 7.0, 6.0, 5.0); by age only those within 2 days of
    # the last apply (7.0, 6.0, 5.0 is exactly 2 days old: kept).
    assert names == ["7.0", "6.0", "5.0"]
    # Ages out later: at start, 10 days on, only the backup 7.0 would roll back with.
    from fleetpush.client.recovery import recover

    assert recover(state, root, now=17 * day, retention=Retention(keep=3, max_age=day)) is None
    names = [info.to_version for _n, info in list_backups(StateLayout.of(state))]
    assert names == ["7.0"]


def test_apply_mode_backs_up_and_migrates_the_data_too(device: tuple[Path, Path]) -> None:
    """An embedded app's apply mode (a real re-exec'd process) gets the data settings
    through saved_args.json, as ``fleetpush update`` without an agent does."""
    import subprocess

    from fleetpush.client.applymode import apply_mode_argv, write_saved_args

    state, root = device
    stage(state, "3.0", 3, release("3.0", "fail"), schema_version=2, min_schema=1)
    db = dump(root / DB)
    done = root.parent / "restarted"
    argv = [sys.executable, "-c", f"open({str(done)!r}, 'w').close()"]
    write_saved_args(state, "3.0", argv, sys.executable, str(root), data=SETTINGS)
    subprocess.run(apply_mode_argv(state, root, "3.0"), check=True, timeout=60)
    assert done.exists()  # the app was exec'd again afterwards, on 2.0
    s = load_state(state)
    assert s.installed_version == "2.0" and s.is_bad("3.0")
    assert "error: column s2 cannot be filled" in str(s.last_result)
    assert dump(root / DB) == db


def test_a_release_without_schema_claims_keeps_the_recorded_schema(
    device: tuple[Path, Path],
) -> None:
    state, root = device
    (StateLayout.of(state).root / schema.SCHEMA_FILE).unlink()  # as before issue 12
    stage(state, "2.1", 3, release("2.1"))  # no schema_version: no claim
    apply_staged(state, root, "2.1", 200.0, data=SETTINGS)
    # Known from 2.0's manifest before the apply; 2.1's says nothing, so it is kept.
    assert record(state) == schema.SchemaRecord(schema=1, version="2.0")
