"""Which backups to keep: ``keep_backups`` and ``backup_max_age`` (issue 12, part 2).

Both limits apply: a backup is pruned when it is beyond the newest
``keep_backups`` (0: no count limit) *or* older than ``backup_max_age``, so
the configuration bounds the disk both ways. Never pruned, whatever its age
or rank: the backup the version on trial would roll back with, and the one
``fleetpush update --rollback`` would use now (the newest backup leading back
from the installed version, install.py's ``_backup_for``). A backup still
being written (``.partial-*``) is dropped only when no journal is pending,
as before (backup.py's ``prune``).

:func:`prunable` is the pure decision; :func:`prune_backups` acts on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from . import backup
from .data_settings import Retention
from .errors import StateError
from .fsutil import remove_tree
from .layout import PARTIAL_PREFIX, StateLayout
from .state import DeviceState


def prunable(
    backups: Iterable[tuple[str, float]], now: float, policy: Retention, protect: set[str]
) -> list[str]:
    """Names to prune among ``(name, created)`` pairs (any order; pure)."""
    ordered = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    out = []
    for rank, (name, created) in enumerate(ordered):
        if name in protect:
            continue
        too_many = policy.keep > 0 and rank >= policy.keep
        too_old = policy.max_age is not None and now - created > policy.max_age
        if too_many or too_old:
            out.append(name)
    return out


def needed(layout: StateLayout, state: DeviceState) -> set[str]:
    """The backups a rollback may need now (module docstring)."""
    keep: set[str] = set()
    if state.trial is not None and state.trial.backup_dir:
        keep.add(state.trial.backup_dir)
    if state.installed_version is not None:
        for name, info in backup.list_backups(layout):  # newest first
            if info.to_version == state.installed_version and info.from_version is not None:
                keep.add(name)
                break
    return keep


def prune_backups(
    layout: StateLayout,
    policy: Retention,
    now: float,
    state: DeviceState,
    *,
    protect: Iterable[str] = (),
    partials: bool = False,
) -> list[str]:
    """Discard what :func:`prunable` names; with ``partials`` also ``.partial-*`` leftovers
    (only with no journal pending). Returns the names discarded. Raises StateError,
    FilesystemError."""
    if partials:
        try:
            names = os.listdir(layout.backups_dir)
        except FileNotFoundError:
            names = []
        except OSError as e:
            raise StateError(f"cannot list {layout.backups_dir}: {e}") from e
        for name in names:
            if name.startswith(PARTIAL_PREFIX):
                remove_tree(layout.backups_dir / name)
    have = [(name, info.created) for name, info in backup.list_backups(layout)]
    drop = prunable(have, now, policy, needed(layout, state) | set(protect))
    for name in drop:
        backup.discard(layout, name)
    return drop


__all__ = ["needed", "prunable", "prune_backups"]
