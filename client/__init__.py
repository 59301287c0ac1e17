"""fleetpush.client: the device side (updater, supervisor, install engine).

Embedded use::

    from fleetpush.client import Updater, UpdaterConfig

    updater = Updater(UpdaterConfig.from_toml("agent.toml"))
    async with trio.open_nursery() as nursery:
        await nursery.start(updater.run)

or ``Updater(config).start_in_thread()`` in an app that is not trio.
"""

from .config import ConfigError, UpdaterConfig
from .download import DownloadError, DownloadResult
from .errors import (
    ApplyError,
    DiskFullError,
    FilesystemError,
    RollbackError,
    StagingError,
    StateError,
    UnsafePathError,
    UpdaterError,
)
from .install import ApplyResult, RecoveryResult, RollbackResult, apply_staged, recover, rollback
from .layout import StateLayout
from .session import ReleaserLink, Unreachable
from .state import DeviceState, load_state
from .trial import check_trial, confirm
from .updater import ThreadHandle, UpdateInfo, Updater, UpdateRefused

__all__ = [
    "ApplyError",
    "ApplyResult",
    "ConfigError",
    "DeviceState",
    "DiskFullError",
    "DownloadError",
    "DownloadResult",
    "FilesystemError",
    "RecoveryResult",
    "ReleaserLink",
    "RollbackError",
    "RollbackResult",
    "StagingError",
    "StateError",
    "StateLayout",
    "ThreadHandle",
    "Unreachable",
    "UnsafePathError",
    "UpdateInfo",
    "UpdateRefused",
    "Updater",
    "UpdaterConfig",
    "UpdaterError",
    "apply_staged",
    "check_trial",
    "confirm",
    "load_state",
    "recover",
    "rollback",
]
