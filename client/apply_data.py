"""The data side of one apply: decided before the journal, acted on at fixed points.

install.py's ``_apply`` asks :func:`plan` first (the schema check of
specs/PROTOCOL.md §7.3.2, and whether a migration runs), gives the backup
:func:`backup_part` to write the data into the partial backup, and calls
:func:`migrate_phase` between installing the files and committing. The
journal's recovery of each phase is data_steps.py's; the pieces are
data_backup.py (copies), schema.py (the rule and the record) and migrate.py
(the command).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import attrs
from attrs import frozen
from fleetpush.protocol.manifest import Manifest

from . import pyenv, schema
from .data_backup import KEY, DataPart, write_data
from .data_settings import DataSettings, locate
from .data_steps import DataJournal
from .errors import ApplyError, StagingError, UpdaterError
from .journal import Journal, crash_point, write_journal
from .layout import StateLayout
from .migrate import Migration, MigrationFailed, run_migration
from .recovery import undo_apply
from .staging import load_staged
from .state import DeviceState, load_state, save_state

StrPath = str | os.PathLike[str]


@frozen(kw_only=True)
class DataPlan:
    verdict: schema.SchemaVerdict
    #: what the journal records for recovery (data_steps.py).
    journal: DataJournal
    #: the migration to run after the install, if any.
    migration: Migration | None


def plan(
    layout: StateLayout,
    manifest: Manifest,
    settings: DataSettings,
    from_version: str | None,
) -> DataPlan:
    """What this apply does with the data; ``verdict.refused`` says it must not run.

    Raises StateError (the schema record is unreadable).
    """
    record = schema.read_record(layout)
    verdict = schema.decide(record.schema, manifest, record.version)
    migration = None
    if verdict.verdict is schema.Verdict.MIGRATE and settings.migrate_command:
        assert verdict.target is not None
        migration = Migration(
            command=settings.migrate_command,
            schema_from=verdict.data,
            schema_to=verdict.target,
            version=manifest.version,
            from_version=from_version,
            timeout=settings.migrate_timeout,
            # Where pyenv.prepare builds (or has built) the release's env.
            venv=pyenv.env_path(layout, manifest) if manifest.python else None,
        )
    journal = DataJournal(
        schema_from=verdict.data,
        schema_to=verdict.target,
        written_by=record.version,
        claims=verdict.verdict is not schema.Verdict.NO_CLAIM,
        retention=settings.retention,
    )
    return DataPlan(verdict=verdict, journal=journal, migration=migration)


def schema_refusal(state_dir: StrPath, version: str) -> str | None:
    """Why staged ``version`` cannot run on this device's data, or None. Reads only.

    For a caller that must know before it stops the app (the agent), which
    then gives the release up (:func:`give_up`) through its state store;
    ``apply_staged`` refuses the same way. A release that is not (or no
    longer) staged is left to ``apply_staged`` to report. Raises StateError.
    """
    layout = StateLayout.of(state_dir)
    try:
        _raw, _signed, manifest = load_staged(layout, version)
    except StagingError:
        return None
    record = schema.read_record(layout)
    verdict = schema.decide(record.schema, manifest, record.version)
    return verdict.reason if verdict.refused else None


def give_up(state: DeviceState, version: str) -> DeviceState:
    """``version`` marked bad and no longer staged: not retried until pushed again."""
    staged = state.staged if state.staged and state.staged.version != version else None
    return attrs.evolve(state.mark_bad(version), staged=staged)


def data_size(root: Path, paths: tuple[str, ...]) -> int:
    """Bytes the data part of a backup will take (about: SQLite may compact)."""
    total = 0
    for path in paths:
        where, rel = locate(root, path)
        with contextlib.suppress(OSError):
            total += (where / rel).stat().st_size
    return total


def backup_part(
    root: Path, settings: DataSettings, dj: DataJournal
) -> Callable[[Path], dict[str, object]]:
    """backup.write_backup's ``parts`` hook: the data into the partial backup."""

    def write(partial: Path) -> dict[str, object]:
        files = write_data(
            root,
            settings.paths,
            partial,
            progress=lambda i: crash_point("apply-mid-data-backup") if i == 0 else None,
        )
        part = DataPart(
            files=files,
            schema_from=dj.schema_from,
            schema_to=dj.schema_to,
            written_by=dj.written_by,
        )
        return {KEY: part.to_json()}

    return write


def migrate_phase(
    layout: StateLayout,
    root: Path,
    journal: Journal,
    migration: Migration,
    step: Callable[[str], None],
) -> Journal:
    """Journal phase migrate, then the migration; on failure code and data are restored
    and the release given up (a deterministic failure: retrying would fail again).

    Raises MigrationFailed (an ApplyError), ApplyError (the restore failed too;
    the journal stays for recover()).
    """
    journal = attrs.evolve(journal, phase="migrate")
    write_journal(layout, journal)
    crash_point("apply-migrate-started")
    step("migrating")
    try:
        run_migration(migration, root)
    except MigrationFailed as e:
        step("rolling_back")
        try:
            undo_apply(layout, root, journal)
        except UpdaterError as e2:
            raise ApplyError(
                f"{e}; restoring code and data failed too ({e2}); recover() will retry"
            ) from e2
        save_state(layout.root, give_up(load_state(layout.root, journal.now), migration.version))
        raise MigrationFailed(
            f"{e}; {journal.from_version or 'the previous version'} and its data restored"
        ) from e
    crash_point("apply-after-migrate")
    return journal


__all__ = [
    "DataPlan",
    "backup_part",
    "data_size",
    "give_up",
    "migrate_phase",
    "plan",
    "schema_refusal",
]
