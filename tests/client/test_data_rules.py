"""The pure rules of issue 12, part 2: schema compatibility, retention, settings; and the
migration runner on a real subprocess."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from fleetpush.client.config import ConfigError, UpdaterConfig
from fleetpush.client.data_settings import Retention, parse_age
from fleetpush.client.migrate import Migration, MigrationFailed, run_migration
from fleetpush.client.retention import prunable
from fleetpush.client.schema import Verdict, decide
from fleetpush.protocol.manifest import Manifest

V = "1.2.0"


def manifest(schema_version: int | None, min_schema: int | None = None) -> Manifest:
    return Manifest(
        app="demo",
        version=V,
        sequence=1,
        created=0,
        chunk_size=65536,
        files=[],
        schema_version=schema_version,
        min_schema=min_schema,
    )


# prose -> (data schema, written by, schema_version, min_schema, verdict, reason)
SCHEMA_CASES: dict[str, tuple[int | None, str | None, int | None, int | None, Verdict, str]] = {
    "no claim: never refused, nothing to migrate": (7, "9.0", None, None, Verdict.NO_CLAIM, ""),
    "same schema: nothing to migrate": (4, "1.1.0", 4, 2, Verdict.CURRENT, ""),
    "older data within reach: migrate": (3, "1.1.0", 4, 2, Verdict.MIGRATE, ""),
    "oldest migratable: migrate": (2, None, 4, 2, Verdict.MIGRATE, ""),
    "unknown data schema: the migration decides": (None, None, 4, 2, Verdict.MIGRATE, ""),
    "newer data, written by a newer release: named": (
        5, "1.3.0", 4, None, Verdict.REFUSE_NEWER,
        "data schema 5 is newer than what 1.2.0 supports (≤ 4): install 1.3.0 or later",
    ),
    "newer data, writer unknown: a hint": (
        5, None, 4, None, Verdict.REFUSE_NEWER,
        "data schema 5 is newer than what 1.2.0 supports (≤ 4): "
        "install a release with schema_version 5 or later",
    ),
    "newer data, writer not newer than this release: a hint": (
        5, "1.0.0", 4, None, Verdict.REFUSE_NEWER,
        "data schema 5 is newer than what 1.2.0 supports (≤ 4): "
        "install a release with schema_version 5 or later",
    ),
    "data older than min_schema: step through": (
        1, "1.0.0", 4, 3, Verdict.REFUSE_OLDER,
        "data schema 1 is older than what 1.2.0 can migrate from (≥ 3): first install a "
        "release that migrates schema 1 to 3 or later (its min_schema ≤ 1), then 1.2.0",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SCHEMA_CASES), ids=list(SCHEMA_CASES))
def test_schema_compatibility(case: str) -> None:
    data, written_by, target, oldest, verdict, reason = SCHEMA_CASES[case]
    got = decide(data, manifest(target, oldest), written_by)
    assert (got.verdict, got.reason) == (verdict, reason)
    assert got.refused == (verdict in (Verdict.REFUSE_NEWER, Verdict.REFUSE_OLDER))


DAY = 86400.0
BACKUPS = [(f"b{i}", i * DAY) for i in range(10)]  # b9 newest

# prose -> (policy, protected, kept)
RETENTION_CASES: dict[str, tuple[Retention, set[str], list[str]]] = {
    "count only": (Retention(keep=3), set(), ["b9", "b8", "b7"]),
    "age only (keep 0: no count limit)": (
        Retention(keep=0, max_age=4 * DAY), set(), ["b9", "b8", "b7", "b6", "b5"],
    ),
    "both: the stricter wins": (Retention(keep=5, max_age=2 * DAY), set(), ["b9", "b8", "b7"]),
    "a backup a rollback needs is never pruned": (
        Retention(keep=2, max_age=DAY), {"b1"}, ["b9", "b8", "b1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RETENTION_CASES), ids=list(RETENTION_CASES))
def test_retention(case: str) -> None:
    policy, protect, kept = RETENTION_CASES[case]
    dropped = prunable(BACKUPS, 9 * DAY, policy, protect)
    assert sorted(set(dict(BACKUPS)) - set(dropped), key=lambda n: -int(n[1:])) == sorted(
        kept, key=lambda n: -int(n[1:])
    )


def test_ages() -> None:
    assert [parse_age(a) for a in ("7d", "12h", "30m", "90s", "2w", "45")] == [
        7 * DAY, 12 * 3600, 1800, 90, 14 * DAY, 45,
    ]  # fmt: skip
    for bad in ("7x", "", "-1d", "0h"):
        with pytest.raises(ValueError, match=r"age|longer"):
            parse_age(bad)


def test_config_refuses_data_paths_leaving_the_app_root(tmp_path: Path) -> None:
    base = dict(app="a", state_dir="s", app_root="app", insecure=True)
    ok = UpdaterConfig.from_mapping(
        {**base, "data_paths": ["data/app.db", "/var/lib/a/app.db"], "backup_max_age": "7d"},
        base=tmp_path,
    )
    assert ok.data_paths == ("data/app.db", "/var/lib/a/app.db")
    with pytest.raises(ConfigError, match=r"data_paths: '\.\./app\.db' contains '\.\.'"):
        UpdaterConfig.from_mapping({**base, "data_paths": ["../app.db"]}, base=tmp_path)
    with pytest.raises(ConfigError, match="backup_max_age"):
        UpdaterConfig.from_mapping({**base, "backup_max_age": "soon"}, base=tmp_path)
    with pytest.raises(ConfigError, match="keep_backups must be a whole number"):
        UpdaterConfig.from_mapping({**base, "keep_backups": -1}, base=tmp_path)


SCRIPT = """
import os, sys, time
print("FROM", repr(os.environ["FLEETPUSH_SCHEMA_FROM"]), "TO", os.environ["FLEETPUSH_SCHEMA_TO"],
      "ROOT", os.environ["FLEETPUSH_APP_ROOT"], "CWD", os.getcwd(),
      "V", os.environ["FLEETPUSH_VERSION"], os.environ["FLEETPUSH_FROM_VERSION"],
      file=open("seen.txt", "w"))
print("warming up", file=sys.stderr)
print("table t is locked", file=sys.stderr)
if sys.argv[1] == "hang":
    time.sleep(60)
sys.exit(int(sys.argv[1]) if sys.argv[1] != "hang" else 0)
"""


def migration(tmp_path: Path, arg: str, timeout: float = 30.0) -> Migration:
    (tmp_path / "m.py").write_text(SCRIPT)
    return Migration(
        command=(sys.executable, "m.py", arg),
        schema_from=None,
        schema_to=3,
        version="2.0.0",
        from_version="1.0.0",
        timeout=timeout,
    )


def test_the_migration_gets_its_schemas_root_and_versions(tmp_path: Path) -> None:
    run_migration(migration(tmp_path, "0"), tmp_path)
    assert (tmp_path / "seen.txt").read_text().split() == [
        "FROM", "''", "TO", "3", "ROOT", str(tmp_path), "CWD", str(tmp_path),
        "V", "2.0.0", "1.0.0",
    ]  # fmt: skip


def test_a_failing_migration_reports_its_last_stderr_line(tmp_path: Path) -> None:
    with pytest.raises(MigrationFailed) as e:
        run_migration(migration(tmp_path, "4"), tmp_path)
    assert str(e.value) == (
        "migration of the data from schema unknown to 3 failed (exit code 4): table t is locked"
    )


def test_a_migration_past_its_timeout_is_killed(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(MigrationFailed, match=r"no result within 1s \(migrate_timeout\)"):
        run_migration(migration(tmp_path, "hang", timeout=1.0), tmp_path)
    assert time.monotonic() - start < 10


def test_a_migration_that_cannot_start(tmp_path: Path) -> None:
    m = Migration(
        command=(str(tmp_path / "nope"),), schema_from=1, schema_to=2, version="2",
        from_version=None, timeout=5,
    )  # fmt: skip
    with pytest.raises(MigrationFailed, match=r"cannot run .*nope"):
        run_migration(m, tmp_path)


def test_the_migration_runs_in_the_release_env(tmp_path: Path) -> None:
    """{python} is the env's interpreter, its bin first on PATH (as the app's, pyenv.py)."""
    import attrs

    venv = tmp_path / "envs" / "2.0.0-2"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "w.py").write_text(
        "import os, sys\n"
        "open('env.txt', 'w').write(' '.join([sys.argv[0], os.environ['VIRTUAL_ENV'],\n"
        "    os.environ['PATH'].split(os.pathsep)[0]]))\n"
    )
    m = attrs.evolve(migration(tmp_path, "0"), command=("{python}", "w.py"), venv=venv)
    assert m.argv() == [str(venv / "bin" / "python"), "w.py"]
    run_migration(m, tmp_path)
    assert (tmp_path / "env.txt").read_text().split() == ["w.py", str(venv), str(venv / "bin")]
