"""Backups: the exact inverse of one apply (layout.py, ``backups/<old>-<ts>/``).

An apply records, before it touches the app root, everything needed to undo
it: the files it will replace or remove (under ``files/``, with their modes),
the paths and directories it will create, and the old manifest.

The files are hard links to the app root's files, not copies, when the backup
and the app root share a filesystem (the usual layout; issue 14): the apply
then *renames* new files over the old paths, so the old inodes live on under
``files/`` at no cost in time or space, and nothing writes them in place.
On another filesystem they are copied, as before. :func:`restore` links them
back the same way (a rename over the path, so a crash leaves either file),
which makes it as repeatable as the copy was. The
backup is written under ``backups/.partial-<name>`` and renamed into place
once complete and fsynced, so a directory without the prefix is always whole;
:func:`restore` can then be repeated any number of times after a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from attrs import field, frozen
from fleetpush.protocol import codec
from fleetpush.protocol.errors import DecodeError

from .errors import RollbackError, StateError, wrap_oserror
from .fslink import fsync_dirs, link_file
from .fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    entry_kind,
    fsync_dir,
    open_for_read,
    read_chunks,
    read_json,
    remove_empty_dirs,
    remove_file,
    remove_temp_files,
    remove_tree,
    replace_file,
)
from .layout import KEEP_BACKUPS, PARTIAL_PREFIX, StateLayout

BACKUP_FORMAT: Final = 1


@frozen(kw_only=True)
class BackupInfo:
    """``backup.json``: what one apply from ``from_version`` to ``to_version`` changed."""

    format: int = BACKUP_FORMAT
    from_version: str | None
    from_sequence: int
    to_version: str
    created: float
    #: path -> permission bits of each file saved under files/ (replaced or removed).
    saved: dict[str, int]
    #: paths that did not exist before the apply.
    created_files: list[str]
    #: directories that did not exist before the apply, shallowest first.
    created_dirs: list[str]
    extra: dict[str, Any] = field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        wire: dict[str, Any] = codec.to_wire(self)
        return wire

    @classmethod
    def from_json(cls, data: object, where: str) -> BackupInfo:
        try:
            return codec.from_wire(cls, data, where)
        except DecodeError as e:
            raise StateError(f"{where} has the wrong shape: {e}") from e


def dirs_of(path: str) -> list[str]:
    """Parent directories of a relative path, shallowest first."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def backup_name(layout: StateLayout, old_version: str | None, now: float) -> str:
    """A fresh ``<old>-<timestamp>`` name (suffixed if two applies share a second)."""
    base = f"{old_version or 'none'}-{int(now)}"
    name, n = base, 1
    while (layout.backups_dir / name).exists() or (
        layout.backups_dir / f"{PARTIAL_PREFIX}{name}"
    ).exists():
        n += 1
        name = f"{base}.{n}"
    return name


def write_backup(
    layout: StateLayout,
    name: str,
    app_root: Path,
    info: BackupInfo,
    *,
    old_manifest: bytes | None,
    progress: Callable[[int], None] = lambda i: None,
    parts: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Save ``info.saved`` from ``app_root`` in ``backups/<name>``, atomically.

    Each file is hard-linked, or copied where it cannot be (module docstring).
    ``progress(i)`` runs after the i-th file is saved (crash points).
    ``parts(partial_dir)`` writes further parts of the backup (the app's data,
    data_backup.py) before it is complete; what it returns is added to
    ``backup.json``, so a part is whole exactly when the backup is.
    Raises :class:`FilesystemError` (incl. DiskFullError, UnsafePathError).
    """
    partial = layout.backups_dir / f"{PARTIAL_PREFIX}{name}"
    remove_tree(partial)
    files = partial / "files"
    try:
        files.mkdir(parents=True)
    except OSError as e:
        raise wrap_oserror(e, f"create {files}") from e
    linked: set[str] = set()
    for i, (path, mode) in enumerate(sorted(info.saved.items())):
        if _link_or_copy(app_root, path, files, mode, error=StateError,
                         missing=f"{app_root}/{path} vanished while being backed up"):
            linked.add(path.rpartition("/")[0])
        progress(i)
    fsync_dirs(files, linked)  # the links are durable before the backup is whole
    if old_manifest is not None:
        atomic_write_bytes(partial / "manifest.signed", old_manifest, 0o644)
    doc = info.to_json()
    if parts is not None:
        doc.update(parts(partial))
    atomic_write_json(partial / "backup.json", doc)
    final = layout.backup_dir(name)
    try:
        os.rename(partial, final)
    except OSError as e:
        raise wrap_oserror(e, f"complete backup {final}") from e
    fsync_dir(layout.backups_dir)
    return final


def read_backup(layout: StateLayout, name: str) -> BackupInfo:
    """Raises :class:`RollbackError` if the backup is missing or unreadable."""
    path = layout.backup_dir(name) / "backup.json"
    try:
        return BackupInfo.from_json(read_json(path), str(path))
    except FileNotFoundError as e:
        raise RollbackError(f"backup {name} is missing") from e
    except (ValueError, StateError) as e:
        raise RollbackError(f"backup {name} is unreadable: {e}") from e


def backup_manifest(layout: StateLayout, name: str) -> bytes | None:
    try:
        return (layout.backup_dir(name) / "manifest.signed").read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RollbackError(f"cannot read the manifest of backup {name}: {e}") from e


def restore(
    layout: StateLayout,
    name: str,
    info: BackupInfo,
    app_root: Path,
    *,
    touched: list[str],
    progress: Callable[[int], None] = lambda i: None,
) -> None:
    """Undo the apply ``info`` describes, idempotently.

    ``touched`` are the paths the apply may have written (their directories
    are cleaned of temp files left by a crash). Order matters: created files
    and directories go first so a file that replaced a directory, or the
    reverse, makes room before the saved files come back.
    """
    for d in sorted({d for p in touched for d in ["", *dirs_of(p)]}):
        remove_temp_files(app_root, d)
    for path in info.created_files:
        remove_file(app_root, path)
    for d in reversed(info.created_dirs):
        remove_empty_dirs(app_root, d, parents=False)
    files = layout.backup_dir(name) / "files"
    linked: set[str] = set()
    for i, (path, mode) in enumerate(sorted(info.saved.items())):
        if _link_or_copy(files, path, app_root, mode, error=RollbackError,
                         missing=f"backup {name} lacks {path}"):
            linked.add(path.rpartition("/")[0])
        progress(i)
    fsync_dirs(app_root, linked)


def _link_or_copy(
    src_root: Path, path: str, dst_root: Path, mode: int, *, missing: str,
    error: type[RollbackError] | type[StateError],
) -> bool:
    """Put ``src_root/path`` at ``dst_root/path``: a hard link, else a copy.

    True if linked (the caller then fsyncs the directory; a copy has done it).
    """
    if entry_kind(src_root, path) is None:
        raise error(missing)
    if link_file(src_root, path, dst_root, mode, sync_dir=False):
        return True
    src = open_for_read(src_root, path)
    if src is None:
        raise error(missing)
    with src:
        replace_file(dst_root, path, read_chunks(src, f"{src_root}/{path}"), mode)
    return False


def discard(layout: StateLayout, name: str) -> None:
    """Delete a backup; renamed to a partial name first so it never looks whole."""
    final = layout.backup_dir(name)
    partial = layout.backups_dir / f"{PARTIAL_PREFIX}{name}"
    if final.exists():
        try:
            os.rename(final, partial)
        except OSError as e:
            raise wrap_oserror(e, f"discard backup {final}") from e
        fsync_dir(layout.backups_dir)
    remove_tree(partial)


def list_backups(layout: StateLayout) -> list[tuple[str, BackupInfo]]:
    """Complete, readable backups, newest first."""
    try:
        names = os.listdir(layout.backups_dir)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StateError(f"cannot list {layout.backups_dir}: {e}") from e
    out = []
    for name in names:
        if name.startswith("."):
            continue
        try:
            out.append((name, read_backup(layout, name)))
        except RollbackError:
            continue
    out.sort(key=lambda item: (item[1].created, item[0]), reverse=True)
    return out


def prune(layout: StateLayout, keep: int = KEEP_BACKUPS, protect: str | None = None) -> None:
    """Keep the newest ``keep`` backups (and ``protect``); drop partial leftovers.

    Only call with no journal present: a partial backup is then never in use.
    """
    try:
        names = os.listdir(layout.backups_dir)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot list {layout.backups_dir}: {e}") from e
    for name in names:
        if name.startswith(PARTIAL_PREFIX):
            remove_tree(layout.backups_dir / name)
    for name, _info in list_backups(layout)[keep:]:
        if name != protect:
            discard(layout, name)
