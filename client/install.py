"""Installing a staged update crash-safely: journal, backup, apply, rollback.

An apply goes through journaled phases (``<state>/journal.json``, always
replaced atomically): backup, install, commit; a rollback restores the
backup the apply made. A crash at any point is finished or undone by
:func:`~fleetpush.client.recovery.recover` (recovery.py, which documents the
policy per phase) at the next start, or before the next apply or rollback.
For tests, :data:`CRASH_ENV` names one of :data:`CRASH_POINTS` at which the
process SIGKILLs itself.

Install by rename (issue 14): each new file is a hard link of its staged
file, renamed over its path (fslink.link_file), and the backup holds hard
links of the old files (backup.py), so an apply copies and hashes nothing:
the STAGED marker says every staged file was verified (staging.py,
specs/PROTOCOL.md §7.2) and only sizes are checked. The staged files stay
whole, so an apply undone by recovery can simply run again. Where the app
root is on another filesystem than the state directory, files are copied
instead (layout.py). Files the installed manifest lists unchanged are not
touched at all.

Durability: a staged file's data was fsynced when it was staged; a new
file's mode and each renamed-into directory are fsynced (once per
directory) before the journal moves on, and the journal moves to the next
phase only once the previous phase is durable.

:func:`recover` and the result classes are re-exported here, as before the
split.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import attrs
from attrs import frozen
from fleetpush.protocol.manifest import FileEntry, Manifest
from fleetpush.protocol.messages import SignedManifest

from . import apply_data, backup, data_steps, pyenv
from .apply_data import give_up, schema_refusal
from .backup import BackupInfo, dirs_of
from .data_settings import DataSettings
from .errors import ApplyError, FilesystemError, RollbackError, StagingError, UpdaterError
from .fslink import fsync_dirs, link_file, stat_file
from .fsutil import (
    MODE_MASK,
    check_free_space,
    entry_kind,
    open_for_read,
    read_chunks,
    remove_empty_dirs,
    remove_file,
    replace_file,
    same_filesystem,
)
from .journal import (
    CRASH_ENV,
    CRASH_POINTS,
    DEFAULT_TRIAL_SECONDS,
    Journal,
    crash_point,
    install_lock,
    read_journal,
    write_journal,
)
from .layout import StateLayout
from .recovery import (
    ApplyResult,
    RecoveryResult,
    RollbackResult,
    finish_apply,
    finish_rollback,
    recover,
    recover_locked,
    undo_apply,
)
from .schema import SchemaRefused
from .staging import (
    check_staged,
    decode_signed_manifest,
    load_installed_manifest,
    load_staged,
    load_staged_manifest,
    mark_staged,
    prune_updates,
    unchanged_paths,
    verify_staged,
)
from .state import DeviceState, load_state, save_state

StrPath = str | os.PathLike[str]

#: Apply attempts of one staged version before it is marked bad.
MAX_APPLY_ATTEMPTS: Final = 3

#: Free space kept in reserve beyond what an apply needs.
SPACE_MARGIN: Final = 64 * 1024


# --- apply -------------------------------------------------------------------------------


@frozen
class _Plan:
    install: list[str]
    remove: list[str]
    unchanged: list[str]
    info: BackupInfo
    need_root: int
    need_backup: int


def _kind(root: Path, path: str) -> str | None:
    """entry_kind, or 'below-file' if a parent directory is a regular file."""
    for d in dirs_of(path):
        k = entry_kind(root, d)
        if k is None:
            return None
        if k == "file":
            return "below-file"
        if k == "other":
            return "other"
    return entry_kind(root, path)


def _plan(
    root: Path, manifest: Manifest, old: Manifest | None, from_version: str | None, now: float
) -> _Plan:
    """What to install, remove, keep and save, from the manifests and ``stat``:
    no file is read (issue 14). A file is unchanged when the installed manifest
    lists it as the new one does and it is there with that size and mode."""
    keep = unchanged_paths(manifest, old)
    new_paths = {f.path for f in manifest.files}
    saved: dict[str, int] = {}
    need_backup = 0
    remove: list[str] = []
    for path in sorted(p.path for p in (old.files if old else []) if p.path not in new_paths):
        kind = _kind(root, path)
        if kind == "other":
            raise ApplyError(f"{root}/{path} is not a regular file; refusing to touch it")
        if kind == "file":
            size, saved[path] = _stat(root, path)
            need_backup += size
            remove.append(path)
    install, unchanged, created_files, created_dirs = [], [], [], []
    seen_dirs: set[str] = set()
    for f in manifest.files:
        kind = _kind(root, f.path)
        if kind == "file":
            size, mode = _stat(root, f.path)
            if f.path in keep and (size, mode) == (f.size, f.mode & MODE_MASK):
                unchanged.append(f.path)
                continue
            saved[f.path], need_backup = mode, need_backup + size
        elif kind == "other":
            raise ApplyError(f"{root}/{f.path} is not a regular file; refusing to touch it")
        elif kind == "below-file" and not any(d in saved for d in dirs_of(f.path)):
            raise ApplyError(f"a file not in the old release is in the way of {f.path}")
        elif kind == "dir" and not any(r.startswith(f.path + "/") for r in remove):
            raise ApplyError(f"{root}/{f.path} is a directory; refusing to replace it")
        else:
            created_files.append(f.path)
        install.append(f.path)
        for d in dirs_of(f.path):
            if d not in seen_dirs:
                seen_dirs.add(d)
                if _kind(root, d) != "dir":
                    created_dirs.append(d)
    undo = BackupInfo(
        from_version=from_version,
        from_sequence=0,
        to_version=manifest.version,
        created=now,
        saved=saved,
        created_files=created_files,
        created_dirs=created_dirs,
    )
    need_root = sum(f.size for f in manifest.files if f.path in set(install))
    return _Plan(install, remove, unchanged, undo, need_root, need_backup)


def _stat(root: Path, path: str) -> tuple[int, int]:
    found = stat_file(root, path)
    if found is None:
        raise ApplyError(f"{root}/{path} vanished while the apply was planned")
    return found


def apply_staged(
    state_dir: StrPath,
    app_root: StrPath,
    version: str,
    now: float,
    *,
    signed: SignedManifest | None = None,
    trial_seconds: float = DEFAULT_TRIAL_SECONDS,
    check_space: bool = True,
    data: DataSettings | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ApplyResult:
    """Install the staged ``version`` into ``app_root`` (see the module docstring).

    ``data`` are the app's data paths, migration and backup retention
    (apply_data.py): the data is backed up with the code, the release's schema
    checked against the data's (a refusal marks it bad and touches nothing),
    and the migration run after the files are installed. ``on_step`` is
    called (from this thread) as each step starts: ``backing_up``,
    ``installing``, ``migrating``, and ``rolling_back`` when a failure makes
    the engine undo what it did; the agent reports them (PROTOCOL.md §7.6).

    ``signed``, if given, is the manifest the caller trusts; it must be the one
    staged. Runs :func:`recover` first if a journal is pending. On success the
    new version is on trial (unless nothing was installed before). On failure
    the old version is left in place and the failure recorded in history.

    Raises :class:`StagingError` (not staged, damaged, bad release, sequence
    below high_water; nothing touched), :class:`DiskFullError`,
    :class:`UnsafePathError`, :class:`FilesystemError`, :class:`ApplyError`,
    :class:`SchemaRefused` (a StagingError), :class:`MigrationFailed` (an
    ApplyError: code and data restored, the release marked bad).
    """
    layout, root = StateLayout.of(state_dir), Path(app_root)
    with install_lock(layout.root):
        if read_journal(layout.root) is not None:
            recover_locked(layout, root, now)
        try:
            return _apply(
                layout, root, version, now,
                signed=signed, trial_seconds=trial_seconds, check_space=check_space,
                data=data or DataSettings(), on_step=on_step,
            )
        except UpdaterError as e:
            with contextlib.suppress(UpdaterError):  # recording is best effort
                state = load_state(layout.root, now)
                save_state(layout.root, state.record(now, "apply-failed", version, str(e)))
            raise


def _apply(
    layout: StateLayout,
    root: Path,
    version: str,
    now: float,
    *,
    signed: SignedManifest | None,
    trial_seconds: float,
    check_space: bool,
    data: DataSettings,
    on_step: Callable[[str], None] | None,
) -> ApplyResult:
    state = load_state(layout.root, now)
    _raw, staged_signed, manifest = load_staged(layout, version)
    if signed is not None and signed.signed != staged_signed.signed:
        raise StagingError(f"the staged manifest of {version} is not the one given")
    if state.app and manifest.app != state.app:
        raise StagingError(f"staged {version} is for app {manifest.app!r}, not {state.app!r}")
    if manifest.sequence < state.high_water:
        raise StagingError(f"staged sequence {manifest.sequence} is below {state.high_water}")
    if state.installed_version == version and state.installed_sequence == manifest.sequence:
        return ApplyResult(version=version, previous_version=version, changed=False)
    staged = state.staged if state.staged and state.staged.version == version else None
    if state.is_bad(version) and not (staged and staged.forced):
        raise StagingError(f"{version} failed on this device before; push it again to retry")
    # Before anything is touched (and before an attempt is counted): a release
    # that cannot run on this data is refused and not tried again (§7.3.2).
    dp = apply_data.plan(layout, manifest, data, state.installed_version)
    if dp.verdict.refused:
        save_state(layout.root, give_up(state, version))
        raise SchemaRefused(dp.verdict.reason)
    if staged is not None:
        # Persist the attempt *before* trying: a crash that recurs on every
        # apply ends in a bad release, not a boot loop (module docstring).
        if staged.attempts >= MAX_APPLY_ATTEMPTS:
            save_state(layout.root, attrs.evolve(state.mark_bad(version), staged=None))
            raise ApplyError(f"{version}: {MAX_APPLY_ATTEMPTS} apply attempts failed; marked bad")
        state = attrs.evolve(state, staged=attrs.evolve(staged, attempts=staged.attempts + 1))
        save_state(layout.root, state)
    # Normally built already, before the app stopped (the agent); a no-op then.
    pyenv.prepare(layout, root, manifest)
    old = load_installed_manifest(layout.root)
    root.mkdir(parents=True, exist_ok=True)
    plan = _plan(root, manifest, old[1] if old else None, state.installed_version, now)
    plan = attrs.evolve(plan, info=attrs.evolve(plan.info, from_sequence=state.installed_sequence))
    # No re-hash: STAGED says every file was verified (staging.py, §7.2).
    check_staged(layout, version, manifest, plan.install)
    if check_space:
        layout.backups_dir.mkdir(parents=True, exist_ok=True)
        # Hard links take no space: only a copy (another filesystem) does.
        need_root = 0 if same_filesystem(root, layout.update_dir(version)) else plan.need_root
        code_backup = 0 if same_filesystem(root, layout.backups_dir) else plan.need_backup
        need_backup = code_backup + apply_data.data_size(root, data.paths)
        plan = attrs.evolve(plan, need_root=need_root)
        if same_filesystem(root, layout.backups_dir):
            check_free_space(root, plan.need_root + need_backup + SPACE_MARGIN, "apply")
        else:
            check_free_space(root, plan.need_root + SPACE_MARGIN, "apply")
            check_free_space(layout.backups_dir, need_backup + SPACE_MARGIN, "backup")
    journal = Journal(
        id=secrets.token_hex(8),
        op="apply",
        phase="backup",
        from_version=state.installed_version,
        to_version=version,
        to_sequence=manifest.sequence,
        backup=backup.backup_name(layout, state.installed_version, now),
        now=now,
        trial_seconds=trial_seconds,
        install=plan.install,
        remove=plan.remove,
        extra={data_steps.KEY: dp.journal.to_json()},
    )
    write_journal(layout, journal)
    crash_point("apply-after-journal")
    old_raw = layout.installed_manifest.read_bytes() if old else None
    step = on_step or _no_step
    step("backing_up")
    try:
        backup.write_backup(
            layout, journal.backup, root, plan.info, old_manifest=old_raw,
            progress=lambda i: crash_point("apply-mid-backup") if i == 0 else None,
            parts=apply_data.backup_part(root, data, dp.journal),
        )
        crash_point("apply-after-backup")
    except UpdaterError:
        undo_apply(layout, root, journal)
        raise
    journal = attrs.evolve(journal, phase="install")
    write_journal(layout, journal)
    crash_point("apply-install-started")
    step("installing")
    try:
        _install(layout, root, manifest, journal)
    except UpdaterError as e:
        step("rolling_back")
        try:
            undo_apply(layout, root, journal)
        except UpdaterError as e2:
            raise ApplyError(
                f"apply failed ({e}) and undoing it failed too ({e2}); recover() will retry"
            ) from e2
        raise
    crash_point("apply-after-install")
    if dp.migration is not None:
        journal = apply_data.migrate_phase(layout, root, journal, dp.migration, step)
    journal = attrs.evolve(journal, phase="commit")
    write_journal(layout, journal)
    crash_point("apply-after-commit-journal")
    result = finish_apply(layout, journal)
    return attrs.evolve(result, unchanged=tuple(plan.unchanged))


def _no_step(step: str) -> None:
    pass


def _install(layout: StateLayout, root: Path, manifest: Manifest, journal: Journal) -> None:
    for i, path in enumerate(journal.remove):
        remove_file(root, path)
        remove_empty_dirs(root, path.rpartition("/")[0])
        if i == 0:
            crash_point("apply-mid-remove")
    assert journal.to_version is not None
    files = layout.staged_files(journal.to_version)
    entries = {f.path: f for f in manifest.files}
    renamed: set[str] = set()
    for i, path in enumerate(journal.install):
        if _install_one(files, root, entries[path], first=i == 0):
            renamed.add(path.rpartition("/")[0])
        if i == 0:
            crash_point("apply-mid-install")
    # One fsync per directory renamed into, before the journal may say commit.
    fsync_dirs(root, renamed)


def _install_one(files: Path, root: Path, entry: FileEntry, first: bool) -> bool:
    """Install one staged file: a hard link renamed over its path, else a copy.

    True if renamed (the caller fsyncs the directory). Only the size is
    checked: the STAGED marker says the content was verified (module docstring).
    """

    def before() -> None:
        if first:
            crash_point("apply-mid-file")

    try:
        if link_file(files, entry.path, root, entry.mode, size=entry.size,
                     before_replace=before, sync_dir=False):
            return True
    except FilesystemError as e:
        if entry_kind(files, entry.path) != "file":
            raise StagingError(f"staged {entry.path} vanished") from e
        raise
    src = open_for_read(files, entry.path)
    if src is None:
        raise StagingError(f"staged {entry.path} vanished")
    size = 0

    def chunks() -> Iterator[bytes]:
        nonlocal size
        for chunk in read_chunks(src, f"staged {entry.path}"):
            size += len(chunk)
            yield chunk

    def check() -> None:
        if size != entry.size:
            raise StagingError(f"staged {entry.path} changed after it was staged")
        before()

    with src:
        replace_file(root, entry.path, chunks(), entry.mode, before_replace=check)
    return False


# --- rollback ----------------------------------------------------------------------------


def rollback(
    state_dir: StrPath, app_root: StrPath, reason: str, now: float | None = None
) -> RollbackResult:
    """Restore the version before the installed one from its backup; mark it bad.

    Uses the trial's backup, else the newest backup made by the apply of the
    installed version. Journaled and always finished by :func:`recover`.
    Raises :class:`RollbackError` (no usable backup; nothing touched),
    :class:`FilesystemError` (restore interrupted; recover() finishes it).
    """
    now = time.time() if now is None else now
    layout, root = StateLayout.of(state_dir), Path(app_root)
    with install_lock(layout.root):
        if read_journal(layout.root) is not None:
            recover_locked(layout, root, now)
        return _rollback_locked(layout, root, reason, now)


def _rollback_locked(
    layout: StateLayout, root: Path, reason: str, now: float
) -> RollbackResult:
    """:func:`rollback` for a caller already holding :func:`install_lock` (trial.py)."""
    state = load_state(layout.root, now)
    failed = state.installed_version
    if failed is None:
        raise RollbackError("nothing is installed")
    name = _backup_for(layout, state, failed)
    info = backup.read_backup(layout, name)
    journal = Journal(
        id=secrets.token_hex(8),
        op="rollback",
        phase="restore",
        from_version=failed,
        to_version=info.from_version,
        to_sequence=info.from_sequence,
        backup=name,
        now=now,
        install=sorted(info.saved),
        remove=list(info.created_files),
        reason=reason,
    )
    write_journal(layout, journal)
    crash_point("rollback-after-journal")
    return finish_rollback(layout, root, journal)


def _backup_for(layout: StateLayout, state: DeviceState, failed: str) -> str:
    if state.trial and state.trial.version == failed and state.trial.backup_dir:
        return state.trial.backup_dir
    for name, info in backup.list_backups(layout):
        # Never "roll back" a first install to an empty device.
        if info.to_version == failed and info.from_version is not None:
            return name
    raise RollbackError(f"no backup leads back from {failed}")


__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "DEFAULT_TRIAL_SECONDS",
    "MAX_APPLY_ATTEMPTS",
    "ApplyResult",
    "RecoveryResult",
    "RollbackResult",
    "apply_staged",
    "crash_point",
    "decode_signed_manifest",
    "give_up",
    "install_lock",
    "load_installed_manifest",
    "load_staged_manifest",
    "mark_staged",
    "prune_updates",
    "read_journal",
    "recover",
    "rollback",
    "schema_refusal",
    "verify_staged",
]
