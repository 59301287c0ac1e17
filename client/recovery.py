"""Finishing or undoing an interrupted apply or rollback: the journal's recovery.

An apply or a rollback (install.py) goes through journaled phases
(``<state>/journal.json``, always replaced atomically). :func:`recover` runs at
every start and, if a journal is present, leaves the app root holding exactly
one complete version:

============  ===========================================  =======================
journal       what may have happened                       recovery
============  ===========================================  =======================
apply/backup  backup partly written; app root untouched    **undo**: discard the
                                                           backup. Nothing to
                                                           restore; cheapest.
apply/install some old files removed or replaced, some     **undo**: restore the
              new ones written (temp files may be left)    complete backup (old
                                                           version). The old
                                                           version is known to
                                                           run; a crash in the
                                                           middle of an apply
                                                           (OOM, disk full, power)
                                                           may well recur, so we
                                                           do not retry it at
                                                           boot. The network side
                                                           retries, bounded by
                                                           MAX_APPLY_ATTEMPTS.
apply/migrate every new file in place; the migration command     **undo**: restore the
              was running (a kill -9 of the agent kills it too) backup: code *and*
                                                           data (data_steps.py)
apply/commit  every new file in place and verified;        **finish**: write the
              installed/manifest.signed and state.json     manifest and state
              may or may not be updated                    (idempotent). Undoing
                                                           now would throw away a
                                                           complete, verified
                                                           install.
rollback      files partly restored, state partly updated  **finish** the
                                                           rollback: the backup is
                                                           complete and the reason
                                                           (failed trial) holds.
============  ===========================================  =======================

Every step of undo and finish is idempotent, so a crash *during recovery* is
recovered by running it again. For tests, :data:`CRASH_ENV` names one of
:data:`CRASH_POINTS` at which the process SIGKILLs itself.

Durability: files are written to temp files, fsynced and renamed, and the
directory fsynced (fsutil); the journal moves to the next phase only once the
previous phase is durable.

Install by rename (issue 14) adds no window to this table: a new file is a
hard link of its staged file under a temp name, renamed over its path (a
kill leaves the old file or the new one, and maybe a temp name that undo
removes), and the backup holds hard links of the old files, which undo
links back the same way. The staged files are never consumed, so an apply
undone here can run again from the same staging area.

The last phase of each operation lives here too (:func:`finish_apply`,
:func:`finish_rollback`): an operation and its recovery run the same code.
This module does not import install.py, which starts the operations.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import attrs
from attrs import frozen

from . import backup, data_steps, pyenv
from .data_settings import Retention
from .errors import RollbackError, StateError
from .fsutil import atomic_write_bytes
from .journal import Journal, crash_point, install_lock, read_journal, remove_journal
from .layout import StateLayout
from .staging import decode_signed_manifest, prune_updates, read_bytes
from .state import TrialInfo, load_state, save_state

StrPath = str | os.PathLike[str]


def record_once(
    layout: StateLayout, journal: Journal, now: float, event: str, *, version: str | None,
    error: str | None = None,
) -> None:
    """Record ``event`` for ``journal`` unless a crash already let it be recorded."""
    state = load_state(layout.root, now)
    if any(h.get("journal") == journal.id for h in state.history):
        return
    state = state.record(now, event, version, error)
    entry = {**state.history[-1], "journal": journal.id}
    save_state(
        layout.root, attrs.evolve(state, history=(*state.history[:-1], entry), last_result=entry)
    )



# --- results -----------------------------------------------------------------------------


@frozen(kw_only=True)
class ApplyResult:
    version: str
    previous_version: str | None
    #: False if the version was already installed (nothing done).
    changed: bool
    installed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: backups/<name> that undoes this apply.
    backup: str | None = None
    trial_deadline: float | None = None


@frozen(kw_only=True)
class RollbackResult:
    version: str | None  # the version now installed
    failed_version: str
    backup: str
    #: when the data restored was backed up; None: the data was kept (data_steps.py).
    data_restored: float | None = None


@frozen(kw_only=True)
class RecoveryResult:
    op: str
    phase: str
    action: str  # "undone" | "completed"
    version: str | None  # the version now installed



def finish_apply(layout: StateLayout, journal: Journal) -> ApplyResult:
    """Commit phase: installed manifest, state, journal removal. Idempotent."""
    version = journal.to_version
    assert version is not None
    raw = read_bytes(layout.staged_manifest(version), f"staged manifest of {version} vanished")
    _signed, manifest = decode_signed_manifest(raw, str(layout.staged_manifest(version)))
    try:
        current = layout.installed_manifest.read_bytes()
    except FileNotFoundError:
        current = None
    except OSError as e:
        raise StateError(f"cannot read {layout.installed_manifest}: {e}") from e
    if current != raw:
        atomic_write_bytes(layout.installed_manifest, raw)
        crash_point("apply-after-manifest")
    pyenv.sync_link(layout)  # the env follows the installed manifest (pyenv.py)
    state = load_state(layout.root, journal.now)
    deadline = journal.now + journal.trial_seconds if journal.from_version is not None else None
    if (state.installed_version, state.installed_sequence) != (version, journal.to_sequence):
        forced = state.staged is not None and state.staged.forced
        trial = None
        if journal.from_version is not None and deadline is not None:
            trial = TrialInfo(
                version=version,
                previous_version=journal.from_version,
                backup_dir=journal.backup,
                started_at=journal.now,
                deadline=deadline,
            )
        state = attrs.evolve(
            state,
            app=state.app or manifest.app,
            installed_version=version,
            installed_sequence=journal.to_sequence,
            staged=None if state.staged and state.staged.version == version else state.staged,
            trial=trial,
        ).raise_high_water(journal.to_sequence)
        if forced:
            state = state.clear_bad(version)
        state = state.record(journal.now, "applied" if trial else "committed", version)
        save_state(layout.root, state)
    data_steps.after_commit(layout, journal)
    crash_point("apply-after-state")
    remove_journal(layout)
    data_steps.prune_after_commit(layout, journal)  # keep_backups / backup_max_age
    pyenv.prune(layout)  # after the backups: envs go with theirs
    return ApplyResult(
        version=version,
        previous_version=journal.from_version,
        changed=True,
        installed=tuple(journal.install),
        removed=tuple(journal.remove),
        backup=journal.backup,
        trial_deadline=deadline,
    )



def undo_apply(
    layout: StateLayout, root: Path, journal: Journal, now: float | None = None
) -> None:
    """Put the old version back after an apply stopped before its commit phase.

    With ``now`` (recovery), an ``apply-interrupted`` event is recorded once
    before the journal goes, so a crash here neither loses nor doubles it.
    """
    if journal.phase in ("install", "migrate"):
        info = backup.read_backup(layout, journal.backup)
        backup.restore(
            layout, journal.backup, info, root, touched=[*journal.install, *journal.remove],
            progress=lambda i: crash_point("undo-mid-restore") if i == 0 else None,
        )
        data_steps.undo_migration(layout, root, journal)
    pyenv.sync_link(layout)  # back to the old version's env if a crash moved it
    if now is not None:
        record_once(
            layout, journal, now, "apply-interrupted", version=journal.to_version,
            error=f"interrupted in phase {journal.phase}; {journal.from_version} kept",
        )
    remove_journal(layout)
    backup.discard(layout, journal.backup)



def finish_rollback(layout: StateLayout, root: Path, journal: Journal) -> RollbackResult:
    """Restore files, manifest and state from the backup. Idempotent."""
    assert journal.from_version is not None
    info = backup.read_backup(layout, journal.backup)
    if info.to_version != journal.from_version:
        raise RollbackError(f"backup {journal.backup} does not undo {journal.from_version}")
    backup.restore(
        layout, journal.backup, info, root, touched=[*journal.install, *journal.remove],
        progress=lambda i: crash_point("rollback-mid-restore") if i == 0 else None,
    )
    data_restored = data_steps.after_code_restored(layout, root, journal, info)
    crash_point("rollback-after-restore")
    old_manifest = backup.backup_manifest(layout, journal.backup)
    if old_manifest is not None:
        atomic_write_bytes(layout.installed_manifest, old_manifest)
    else:
        with contextlib.suppress(FileNotFoundError):
            layout.installed_manifest.unlink()
    pyenv.sync_link(layout)  # the old version's env, kept with its backup: no reinstall
    state = load_state(layout.root, journal.now)
    failed = journal.from_version
    if state.installed_version != journal.to_version or not state.is_bad(failed):
        state = attrs.evolve(
            state,
            installed_version=journal.to_version,
            installed_sequence=journal.to_sequence,
            trial=None,
            staged=None if state.staged and state.staged.version == failed else state.staged,
        ).mark_bad(failed)
        # The version it runs again, and which one failed and why (issue 11, item 6).
        why = f"{failed}: {journal.reason}"
        if data_restored is not None:  # issue 12: the operator sees the data went back too
            why += f"; {data_steps.describe_restore(data_restored)}"
        state = state.record(journal.now, "rolled-back", journal.to_version, why)
        save_state(layout.root, state)
    crash_point("rollback-after-state")
    remove_journal(layout)
    backup.discard(layout, journal.backup)
    prune_updates(layout.root, {state.staged.version} if state.staged else set())
    pyenv.prune(layout)
    return RollbackResult(
        version=journal.to_version, failed_version=failed, backup=journal.backup,
        data_restored=data_restored,
    )



# --- recovery ----------------------------------------------------------------------------


def recover(
    state_dir: StrPath,
    app_root: StrPath,
    now: float | None = None,
    *,
    retention: Retention | None = None,
) -> RecoveryResult | None:
    """Finish or undo an interrupted apply or rollback (policy: module docstring).

    Run at every start, before the app. Returns what was done, or None if
    nothing was pending. Raises :class:`StateError` (corrupt journal),
    :class:`FilesystemError`/:class:`RollbackError` (recovery failed; the
    journal stays so the next start tries again).
    """
    layout = StateLayout.of(state_dir)
    with install_lock(layout.root):
        return recover_locked(
            layout, Path(app_root), time.time() if now is None else now, retention=retention
        )


def recover_locked(
    layout: StateLayout, root: Path, now: float, *, retention: Retention | None = None
) -> RecoveryResult | None:
    journal = read_journal(layout.root)
    if journal is None:
        # Partial leftovers, and backups beyond keep_backups / backup_max_age
        # (``retention``: the config's; default 5), never one a rollback needs.
        data_steps.prune_at_start(layout, retention or Retention(), now)
        pyenv.sync_link(layout)
        pyenv.prune(layout)
        return None
    if journal.op == "rollback":
        finish_rollback(layout, root, journal)
        return RecoveryResult(
            op="rollback", phase=journal.phase, action="completed", version=journal.to_version
        )
    if journal.phase == "commit":
        finish_apply(layout, journal)
        return RecoveryResult(
            op="apply", phase="commit", action="completed", version=journal.to_version
        )
    undo_apply(layout, root, journal, now)
    return RecoveryResult(
        op="apply", phase=journal.phase, action="undone", version=journal.from_version
    )


__all__ = [
    "ApplyResult",
    "RecoveryResult",
    "RollbackResult",
    "finish_apply",
    "finish_rollback",
    "recover",
    "recover_locked",
    "undo_apply",
]
