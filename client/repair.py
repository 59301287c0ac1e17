"""Repairs at start: a corrupt journal, state file or device key never bricks the device.

Issue 10, item 12: a truncated or zeroed ``journal.json`` used to stop every
start with a traceback, and an unreadable ``state.json`` *and* ``.bak``, or a
truncated ``device.key``, with a clean error; either way the app never ran
and a service manager restarted it in a loop. :func:`repair` runs before
anything reads those files (``Updater.__init__``) and returns one line per
repair; the updater logs each and records it in the history as a
``repaired`` event, which reaches the releaser (specs/PROTOCOL.md §7.6.1).

What is repaired, and how (specs/THREATS.md "a corrupt journal or state"):

* **journal.json unreadable**: what was interrupted is unknown, so the app
  root is checked against every manifest the device has: the installed one
  and the staged ones. If it matches one, that version is what is installed
  (an apply that had finished its files). Otherwise the newest complete
  backup is restored (an apply interrupted in its install phase; its
  ``manifest.signed`` says which version that is) and checked again. The
  journal is then removed: the app root holds one version, said in the log.
* **state.json and state.json.bak both unreadable**: both are moved aside
  (``*.corrupt-<time>``, for whoever investigates) and the state is rebuilt
  from the installed manifest: version, sequence, and as trust high-water
  mark the highest sequence of any manifest the device holds (the mark can
  only be lower than before, never higher: see THREATS).
* **device.key unreadable**: moved aside and a new key generated. The
  releaser knows the device by its old key and refuses the new one, so the
  log says that an operator must run ``fleetpush devices forget <id>`` (or
  enrol the device under a new id). The app runs meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import attrs
from fleetpush.protocol.errors import FleetpushError
from fleetpush.protocol.keys import KeyFormatError, private_key_from_pem
from fleetpush.protocol.manifest import Manifest

from . import backup
from .errors import StateError
from .fsutil import atomic_write_bytes, file_info, fsync_dir
from .journal import read_journal, remove_journal
from .layout import StateLayout
from .staging import decode_signed_manifest
from .state import DeviceState, load_state, save_state

log = logging.getLogger("fleetpush.client.updater")

StrPath = str | os.PathLike[str]


def repair(
    state_dir: StrPath, app_root: StrPath, *, app: str, version: str | None, device_id: str
) -> list[str]:
    """Repair what would keep the device from starting; one line per repair.

    ``app``/``version`` are the configured ones (a rebuilt state starts from
    them when no manifest says better). Never raises for a corrupt file;
    raises FilesystemError if a repair cannot be written (a read-only or full
    disk: nothing else would work either).
    """
    layout = StateLayout.of(state_dir)
    root = Path(app_root)
    repairs: list[str] = []
    if layout.root.exists():
        try:
            load_state(layout.root)
        except StateError:
            repairs.append(_rebuild_state(layout, root, app, version))
        try:
            read_journal(layout.root)
        except StateError as e:
            repairs.append(_repair_journal(layout, root, e))
        key = _repair_key(layout, device_id)
        if key is not None:
            repairs.append(key)
    return repairs


# --- the journal ---------------------------------------------------------------------------


def _matches(root: Path, manifest: Manifest) -> bool:
    """True if every file of ``manifest`` is in ``root`` with its size and digest."""
    for f in manifest.files:
        try:
            info = file_info(root, f.path, manifest.hash)
        except FleetpushError:
            return False
        if info is None or info.size != f.size or info.digest != f.digest:
            return False
    return True


def _manifests(layout: StateLayout) -> list[tuple[bytes, Manifest, str]]:
    """(raw, manifest, where) of the installed manifest, then the staged ones."""
    paths = [layout.installed_manifest]
    with contextlib.suppress(OSError):
        paths += sorted(p / "manifest.signed" for p in layout.updates_dir.iterdir())
    out = []
    for path in paths:
        try:
            raw = path.read_bytes()
            _signed, manifest = decode_signed_manifest(raw, str(path))
        except (OSError, FleetpushError):
            continue
        out.append((raw, manifest, str(path.relative_to(layout.root))))
    return out


def _install_record(
    layout: StateLayout, raw: bytes | None, version: str | None, sequence: int
) -> None:
    """Record ``version`` as installed: its manifest file (``raw``; None: it has
    none, e.g. the version the device was set up with) and the state."""
    if raw is not None:
        layout.installed_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(layout.installed_manifest, raw, 0o600)
    else:
        with contextlib.suppress(FileNotFoundError):
            layout.installed_manifest.unlink()  # it describes the version undone
            fsync_dir(layout.installed_dir)
    try:
        state = load_state(layout.root)
    except StateError:
        return  # rebuilt by _rebuild_state, which runs first
    if (state.installed_version, state.installed_sequence) != (version, sequence):
        save_state(
            layout.root,
            attrs.evolve(
                state,
                installed_version=version,
                installed_sequence=sequence,
                trial=None,
                staged=None if state.staged and state.staged.version == version else state.staged,
            ).raise_high_water(sequence),
        )


def _repair_journal(layout: StateLayout, root: Path, error: StateError) -> str:
    why = f"journal.json was unreadable ({error})"
    found = _manifests(layout)
    for raw, manifest, where in found:
        if _matches(root, manifest):
            _install_record(layout, raw, manifest.version, manifest.sequence)
            remove_journal(layout)
            return f"{why}: the app root matches {manifest.version} ({where}); journal removed"
    failure = ""
    try:
        restored = _restore_newest_backup(layout, root)
    except FleetpushError as e:  # a damaged backup: the app root stays as it is
        restored, failure = None, f" (restoring the newest backup failed: {e})"
    remove_journal(layout)
    if restored is not None:
        return f"{why}: {restored}; journal removed"
    return (
        f"{why}: the app root matches no manifest this device has (of "
        f"{len(found)}) and no backup restores one{failure}; journal removed, started as is"
    )


def _restore_newest_backup(layout: StateLayout, root: Path) -> str | None:
    """Undo the newest apply from its backup if that yields a verified version.

    Returns what was restored, or None (no backup, or the result does not
    match the backup's manifest). Raises RollbackError/FilesystemError/StateError.
    """
    backups = backup.list_backups(layout)
    if not backups:
        return None
    name, info = backups[0]
    backup.restore(layout, name, info, root, touched=[*info.saved, *info.created_files])
    raw_old = backup.backup_manifest(layout, name)
    old: Manifest | None = None
    if raw_old is not None:
        with contextlib.suppress(FleetpushError):
            old = decode_signed_manifest(raw_old, name)[1]
    if old is not None and not _matches(root, old):
        return None
    _install_record(layout, raw_old, info.from_version, info.from_sequence)
    verified = " (verified against its manifest)" if old is not None else ""
    return f"restored {info.from_version} from backup {name}{verified}"


# --- the state file ------------------------------------------------------------------------


def _rebuild_state(layout: StateLayout, root: Path, app: str, version: str | None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (layout.state_file, layout.state_backup):
        with contextlib.suppress(FileNotFoundError):
            path.replace(path.with_name(f"{path.name}.corrupt-{stamp}"))
    fsync_dir(layout.root)
    state = DeviceState(app=app, installed_version=version)
    known = _manifests(layout)
    for _raw, m, _where in known:
        state = state.raise_high_water(m.sequence)
    installed = next((m for _r, m, w in known if w.startswith("installed")), None)
    basis = "the configured version"
    if installed is not None and _matches(root, installed):
        basis = "the installed manifest"
        state = attrs.evolve(
            state, installed_version=installed.version, installed_sequence=installed.sequence
        )
    save_state(layout.root, state)
    return (
        f"state.json and state.json.bak were unreadable (moved aside as *.corrupt-{stamp}): "
        f"rebuilt from {basis}: {state.installed_version or 'no version'}, "
        f"high-water mark {state.high_water}"
    )


# --- the device key ------------------------------------------------------------------------


def _repair_key(layout: StateLayout, device_id: str) -> str | None:
    path = layout.device_key
    try:
        private_key_from_pem(path.read_bytes())
    except (FileNotFoundError, PermissionError):
        return None  # a first start; or the session says what is wrong
    except (KeyFormatError, OSError, ValueError) as e:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path.replace(path.with_name(f"{path.name}.corrupt-{stamp}"))
        fsync_dir(layout.root)
        return (
            f"device.key was unreadable ({e}; moved aside as device.key.corrupt-{stamp}): "
            f"a new key is generated; the releaser knows {device_id} by its old key and will "
            f"refuse this one: an operator must forget the device on the releaser "
            f"(`fleetpush devices forget {device_id}`) or give it a new device_id"
        )
    return None


__all__ = ["repair"]
