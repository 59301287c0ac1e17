"""Errors of the device-side updater, all under :class:`FleetpushError`.

Tree::

    UpdaterError
    ├── StateError          state.json / journal unreadable or inconsistent
    ├── StagingError        a staged update is missing, incomplete or does not
    │                       match its signed manifest (nothing was touched)
    ├── UpdateRefused       nothing applicable offered, or a release refused
    ├── FilesystemError     an OSError while reading or writing files
    │   ├── DiskFullError   ENOSPC / EDQUOT, or the free-space check failed
    │   └── UnsafePathError a symlink or non-directory in the way of a path
    └── ApplyError          installing an update failed; the old version is
        │                   left in place (or will be, by recover())
        └── RollbackError   no usable backup, or restoring it failed

Every OSError is wrapped at the boundary with ``raise ... from e``
(STYLE.md §2), so callers catch only this tree.
"""

from __future__ import annotations

import errno

from fleetpush.protocol.errors import FleetpushError


class UpdaterError(FleetpushError):
    """Root of the device-side updater's errors."""


class StateError(UpdaterError):
    """Persisted device state or the journal cannot be read or is inconsistent."""


class StagingError(UpdaterError):
    """A staged update is missing, incomplete or does not match its manifest."""


class FilesystemError(UpdaterError):
    """A filesystem operation failed (wraps OSError)."""


class DiskFullError(FilesystemError):
    """Not enough free space (ENOSPC/EDQUOT, or the pre-flight check)."""


class UnsafePathError(FilesystemError):
    """A path would traverse a symlink or leave its root."""


class UpdateRefused(UpdaterError):
    """The update was not done: nothing offered, a bad release, or the releaser refused."""


class ApplyError(UpdaterError):
    """Installing a staged update failed; the previous version stays installed."""


class RollbackError(ApplyError):
    """Restoring the previous version failed or no backup can be used."""


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def wrap_oserror(e: OSError, what: str) -> FilesystemError:
    """The fleetpush error for ``e``; raise it ``from e``."""
    if e.errno in _DISK_FULL:
        return DiskFullError(f"{what}: no space left on device")
    return FilesystemError(f"{what}: {e.strerror or e}")
