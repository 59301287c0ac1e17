"""The data part of a backup: the app's ``data_paths`` and the schema it was at.

An apply backs up the app's data with its code, into the same backup
directory (``backups/<old>-<ts>/data/<n>``), while the backup is still
partial (backup.py's ``parts`` hook), so the data part is whole exactly when
the backup is and a crash mid-copy leaves a partial backup that recovery
discards like any other. ``backup.json`` gains one key::

    "data": {"files": [{"path": "data/app.db", "kind": "sqlite", "mode": 420,
                        "copy": "data/0"}, ...],
             "schema_from": 1, "schema_to": 2}

* An SQLite database (recognised by its 16-byte header ``SQLite format 3\\0``)
  is copied with SQLite's online-backup API (``sqlite3.Connection.backup``),
  never as raw bytes: a database in WAL mode keeps committed transactions in
  ``app.db-wal`` until a checkpoint, and a raw copy of ``app.db`` alone would
  silently lose them. The API reads through SQLite and writes one
  self-contained file.
* Any other file is copied, fsynced, with its permission bits.
* A path that does not exist is recorded as ``absent``: restoring it removes
  what a migration may have created there.

Restoring happens with the app stopped (the agent stops it before a
rollback; recovery runs before the app starts), so a database is restored by
an atomic replace of its file from the copy, after removing its ``-wal``,
``-shm`` and ``-journal`` companions: SQLite would otherwise replay the
migrated database's WAL (or roll back its hot journal) into the restored
file. Removing them first is safe because restoring is idempotent: a crash in
between leaves the journal in place and the restore runs again.

When is data restored? Only when the apply being undone changed the data
schema (``schema_to`` differs from ``schema_from``): a migration ran, or the
new release declared a newer schema and migrated on its own start. A rollback
across a release that kept the schema keeps the current data, including what
was written during the trial (README, "Python services", "Data and migrations").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from attrs import field, frozen

from .backup import BackupInfo
from .data_settings import locate
from .errors import ApplyError, RollbackError, StateError, wrap_oserror
from .fsutil import entry_kind as _entry_kind
from .fsutil import (
    fsync_dir,
    open_for_read,
    read_chunks,
    remove_file,
    replace_file,
)

SQLITE_MAGIC: Final = b"SQLite format 3\x00"
#: Files SQLite keeps beside a database; stale ones must not meet a restored file.
SQLITE_COMPANIONS: Final = ("-wal", "-shm", "-journal")
#: The key of backup.json holding the data part.
KEY: Final = "data"
KINDS: Final = ("sqlite", "file", "absent")


@frozen(kw_only=True)
class DataFile:
    path: str
    kind: str
    mode: int = 0o600
    #: where the copy is, relative to the backup directory (None when absent).
    copy: str | None = None


@frozen(kw_only=True)
class DataPart:
    """``backup.json``'s ``data``: the files saved and the schema change of the apply."""

    files: list[DataFile] = field(factory=list)
    schema_from: int | None = None
    schema_to: int | None = None
    #: the release that brought the data to ``schema_from``, if known.
    written_by: str | None = None

    @property
    def changes_schema(self) -> bool:
        """The apply moved the data to another schema: undoing it restores the data."""
        return self.schema_to is not None and self.schema_to != self.schema_from

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [
                {"path": f.path, "kind": f.kind, "mode": f.mode, "copy": f.copy} for f in self.files
            ],
            "schema_from": self.schema_from,
            "schema_to": self.schema_to,
            "written_by": self.written_by,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> DataPart:
        """Raises :class:`StateError` for a part of the wrong shape."""
        try:
            assert isinstance(data, dict)
            files = []
            for f in data.get("files", []):
                assert f["kind"] in KINDS and isinstance(f["path"], str)
                files.append(
                    DataFile(path=f["path"], kind=f["kind"], mode=int(f["mode"]), copy=f["copy"])
                )
            return cls(
                files=files,
                schema_from=_opt_int(data.get("schema_from")),
                schema_to=_opt_int(data.get("schema_to")),
                written_by=_opt_str(data.get("written_by")),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            raise StateError(f"{where}: the data part has the wrong shape") from e


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)
    return value


def data_part(info: BackupInfo, name: str) -> DataPart | None:
    """The data part of backup ``name``, or None (an apply made before issue 12).

    Raises :class:`RollbackError` if it is unreadable.
    """
    raw = info.extra.get(KEY)
    if raw is None:
        return None
    try:
        return DataPart.from_json(raw, f"backup {name}")
    except StateError as e:
        raise RollbackError(str(e)) from e


# --- backing up ----------------------------------------------------------------------------


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError as e:
        raise wrap_oserror(e, f"read {path}") from e


def _sqlite_copy(src: Path, dest: Path, mode: int) -> None:
    """The online-backup API from ``src`` into a new file ``dest``, fsynced.

    Raises :class:`ApplyError` (SQLite refused: locked, corrupt),
    :class:`FilesystemError`.
    """
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        # mode=rw: never create a database where there was none.
        source = sqlite3.connect(f"{src.absolute().as_uri()}?mode=rw", uri=True, timeout=10)
        try:
            target = sqlite3.connect(dest)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as e:
        raise ApplyError(f"cannot back up the database {src}: {e}") from e
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise wrap_oserror(e, f"write {dest}") from e


def write_data(
    app_root: Path,
    paths: tuple[str, ...],
    backup_dir: Path,
    progress: Callable[[int], None] = lambda i: None,
) -> list[DataFile]:
    """Copy each data path into ``backup_dir/data/<n>`` (see the module docstring).

    ``progress(i)`` runs after the i-th path (crash points). Raises
    :class:`ApplyError` (a data path is a directory or not a regular file;
    SQLite refused), :class:`FilesystemError`, :class:`UnsafePathError`.
    """
    out: list[DataFile] = []
    data_dir = backup_dir / KEY
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise wrap_oserror(e, f"create {data_dir}") from e
    for i, path in enumerate(paths):
        root, rel = locate(app_root, path)
        kind = _entry_kind(root, rel)
        if kind is None:
            out.append(DataFile(path=path, kind="absent"))
            progress(i)
            continue
        if kind != "file":
            raise ApplyError(f"data path {path} is not a regular file: list the files in it")
        full = root / rel
        try:
            mode = stat.S_IMODE(os.stat(full, follow_symlinks=False).st_mode)
        except OSError as e:
            raise wrap_oserror(e, f"stat {full}") from e
        copy = f"{KEY}/{i}"
        if is_sqlite(full):
            _sqlite_copy(full, backup_dir / copy, mode)
            out.append(DataFile(path=path, kind="sqlite", mode=mode, copy=copy))
        else:
            src = open_for_read(root, rel)
            if src is None:
                raise StateError(f"{full} vanished while being backed up")
            with src:
                replace_file(backup_dir, copy, read_chunks(src, str(full)), mode)
            out.append(DataFile(path=path, kind="file", mode=mode, copy=copy))
        progress(i)
    fsync_dir(data_dir)
    return out


# --- restoring -----------------------------------------------------------------------------


def restore_data(
    app_root: Path,
    backup_dir: Path,
    part: DataPart,
    progress: Callable[[int], None] = lambda i: None,
) -> None:
    """Put every data path back as the backup holds it; idempotent; the app is stopped.

    Raises :class:`RollbackError` (a copy is missing), :class:`FilesystemError`.
    """
    for i, f in enumerate(part.files):
        root, rel = locate(app_root, f.path)
        # Companions first, then the file: never a restored database beside a
        # newer database's WAL or hot journal (module docstring).
        for suffix in SQLITE_COMPANIONS:
            remove_file(root, rel + suffix)
        if f.kind == "absent":
            remove_file(root, rel)
        else:
            assert f.copy is not None
            src = open_for_read(backup_dir, f.copy)
            if src is None:
                raise RollbackError(f"backup {backup_dir.name} lacks its copy of {f.path}")
            with src:
                replace_file(root, rel, read_chunks(src, f"backup of {f.path}"), f.mode)
        progress(i)


__all__ = [
    "KEY",
    "SQLITE_MAGIC",
    "DataFile",
    "DataPart",
    "data_part",
    "is_sqlite",
    "restore_data",
    "write_data",
]
