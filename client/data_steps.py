"""The data steps of the journaled apply and rollback (issue 12, part 2).

install.py and recovery.py call these at fixed points, so the journal's
phases (and their recovery) cover the app's data as they cover its code:

============  ==============================================  =====================
journal       data                                            recovery
============  ==============================================  =====================
apply/backup  being copied into the partial backup            undo: the partial
                                                              backup is discarded
apply/install untouched (the data part of the backup is whole) undo: code restored
apply/migrate the migration may have changed anything         undo: code **and
                                                              data** restored
apply/commit  migrated (or untouched)                         finish: the schema
                                                              record is written
rollback      restored when the apply changed the schema      finish (repeatable)
============  ==============================================  =====================

The journal carries what these steps need under its ``data`` key
(:class:`DataJournal`): the schema before and after, the release that wrote
the data before, and the retention policy, so recovery after a crash needs no
configuration to finish the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from attrs import field, frozen

from . import backup, retention, schema
from .data_backup import data_part, restore_data
from .data_settings import Retention
from .journal import Journal, crash_point
from .layout import StateLayout
from .state import load_state

#: The journal's key for :class:`DataJournal`.
KEY: Final = "data"


@frozen(kw_only=True)
class DataJournal:
    schema_from: int | None = None
    schema_to: int | None = None
    #: the release that brought the data to ``schema_from`` (for the record).
    written_by: str | None = None
    #: a claim was made (the release has a schema_version): record the result.
    claims: bool = False
    retention: Retention = field(factory=Retention)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_from": self.schema_from,
            "schema_to": self.schema_to,
            "written_by": self.written_by,
            "claims": self.claims,
            "retention": self.retention.to_json(),
        }

    @classmethod
    def of(cls, journal: Journal) -> DataJournal:
        """What ``journal`` recorded; the defaults for a journal from before issue 12."""
        raw = journal.extra.get(KEY)
        if not isinstance(raw, dict):
            return cls()

        def opt_int(v: object) -> int | None:
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        written = raw.get("written_by")
        return cls(
            schema_from=opt_int(raw.get("schema_from")),
            schema_to=opt_int(raw.get("schema_to")),
            written_by=written if isinstance(written, str) else None,
            claims=raw.get("claims") is True,
            retention=Retention.from_json(raw.get("retention")),
        )


def after_commit(layout: StateLayout, journal: Journal) -> None:
    """finish_apply, before the journal goes: the data is at the release's schema now.

    Idempotent. Raises FilesystemError.
    """
    dj = DataJournal.of(journal)
    if not dj.claims:
        # No claim: the data stays where it was. Recorded when known, since the
        # fallback (the installed release's schema_version) is now this
        # release's, which has none.
        if dj.schema_from is not None:
            schema.write_record(
                layout, schema.SchemaRecord(schema=dj.schema_from, version=dj.written_by)
            )
        return
    changed = dj.schema_to != dj.schema_from
    schema.write_record(
        layout,
        schema.SchemaRecord(
            schema=dj.schema_to, version=journal.to_version if changed else dj.written_by
        ),
    )


def prune_after_commit(layout: StateLayout, journal: Journal) -> None:
    """finish_apply's pruning: the journal's retention; this apply's backup kept."""
    state = load_state(layout.root, journal.now)
    retention.prune_backups(
        layout,
        DataJournal.of(journal).retention,
        journal.now,
        state,
        protect={journal.backup},
        partials=True,  # the journal is gone: no partial backup is in use
    )


def undo_migration(layout: StateLayout, root: Path, journal: Journal) -> None:
    """undo_apply in phase migrate: the data back as the backup holds it (code is restored
    by the caller). Raises RollbackError, FilesystemError."""
    if journal.phase != "migrate":
        return
    info = backup.read_backup(layout, journal.backup)
    part = data_part(info, journal.backup)
    if part is not None:
        restore_data(
            root,
            layout.backup_dir(journal.backup),
            part,
            progress=lambda i: crash_point("undo-mid-data-restore") if i == 0 else None,
        )


def after_code_restored(
    layout: StateLayout, root: Path, journal: Journal, info: backup.BackupInfo
) -> float | None:
    """finish_rollback, once the code is back: restore the data if the apply being undone
    changed the schema, and record the schema it is at again.

    Returns when the restored data was backed up (``info.created``), or None
    if the data was kept. Idempotent. Raises RollbackError, FilesystemError.
    """
    part = data_part(info, journal.backup)
    if part is None or not part.changes_schema or not part.files:
        return None  # kept: no schema change to undo, or no data_paths to restore
    restore_data(
        root,
        layout.backup_dir(journal.backup),
        part,
        progress=lambda i: crash_point("rollback-mid-data-restore") if i == 0 else None,
    )
    schema.write_record(
        layout, schema.SchemaRecord(schema=part.schema_from, version=part.written_by)
    )
    return info.created


__all__ = [
    "KEY",
    "DataJournal",
    "after_code_restored",
    "after_commit",
    "prune_after_commit",
    "prune_at_start",
    "undo_migration",
]


def rollback_fields(restored: float | None) -> dict[str, Any]:
    """What a rollback did with the data, for JSON answers (device_ops, the CLI)."""
    when = None
    if restored is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(restored))
    return {"data_restored": restored is not None, "data_backup_time": when}


def describe_restore(restored: float) -> str:
    return "data restored from backup of " + time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(restored)
    )


def describe_rollback(doc: dict[str, Any]) -> str:
    """``rolled back 2.0.0 -> 1.0.0; data restored from backup of <time>`` (or kept)."""
    line = f"rolled back {doc.get('rolled_back')} -> {doc.get('installed')}"
    if doc.get("data_restored"):
        return f"{line}; data restored from backup of {doc.get('data_backup_time')}"
    return f"{line}; data kept (no schema change to undo)"


def prune_at_start(layout: StateLayout, policy: Retention, now: float) -> None:
    """recover() with no journal pending: partial leftovers and what the policy drops."""
    retention.prune_backups(layout, policy, now, load_state(layout.root, now), partials=True)
