"""Where the device keeps its state: the shared contract of fleetpush.client.

Everything the updater persists lives under one *state directory*; the app's
own files live in a separate *app root* given by configuration::

    <state>/
      device.key                 Ed25519 PEM, 0600 (created by the network side)
      state.json                 persisted DeviceState (client/state.py), always
                                 replaced atomically; state.json.bak is the
                                 previous good copy
      root.json                  the newest root of trust walked to (client/roots.py,
                                 specs/PROTOCOL.md §8.5), replaced atomically
      journal.json               apply / rollback journal (client/install.py)
      lock                       flock()ed while an install operation runs
      owner.lock                 flock()ed by the one owner of the device (the agent,
                                 an embedded Updater.run, or a direct device command)
                                 for its lifetime; holds its pid (client/owner.py)
      control.sock               the owner's control socket, 0600 (client/control.py)
      agent-child.json           the app child of ``fleetpush agent``: pid, /proc
                                 start time, process group (client/child_record.py);
                                 present only while the agent has a child running
      installed/manifest.signed  SignedManifest wire map {"signed": bin,
                                 "signatures": [...]} of the installed version
      updates/<version>/manifest.signed
      updates/<version>/files/<path>      staged content (the downloader writes
                                          here chunk by chunk); may lack files
                                          the installed manifest lists unchanged.
                                          Apply hard-links each file into the
                                          app root (it stays here too, until
                                          the version is confirmed or dropped)
      updates/<version>/saved_args.json   argv, executable, cwd, version,
                                          timestamp of the process to exec
                                          after apply mode (client/applymode.py)
      updates/<version>/STAGED            marker written atomically once every
                                          file verified whole; JSON holding the
                                          version and the sha256 of
                                          manifest.signed (install.mark_staged)
      data-schema.json           the schema the app's data is at, and the release
                                 that wrote it (client/schema.py)
      backups/<old-version>-<ts>/         one per apply, kept by keep_backups and
                                          backup_max_age (client/retention.py):
        backup.json                       what the apply changed (its inverse),
                                          and its "data" part (data_backup.py)
        manifest.signed                   the manifest of <old-version>
        files/<path>                      files replaced or removed by the apply
                                          (hard links to the old files)
        data/<n>                          the n-th of data_paths as it was
      backups/.partial-*                  a backup being written (never used)
      envs/<version>-<sequence>/          a release's Python env (client/pyenv.py);
                                          .complete inside once whole
      envs/current                        symlink to the installed version's env

``<version>`` is always the canonical PEP 440 string of the release, which
never contains a path separator (checked by :func:`version_dir_name`).

The state directory and the app root should be on one filesystem (issue 14).
An apply then installs each new file by renaming a hard link of its staged
file over its path, and backs up each old file as a hard link in
``backups/``: it copies nothing and hashes nothing (the STAGED marker says
every file was verified, staging.py), so applying a release costs a rename
per file and an fsync per directory, whatever its size. The staged files
stay whole, so an apply undone by recovery runs again as it is, and every
reader of ``updates/`` (pyenv.py, repair.py, prune) sees what it saw
before. If the two are on different filesystems (or one without hard
links), an apply copies files into the app root and into ``backups/``, as
before: slower, and the free-space check counts the copies. Nothing writes
a release file in place, so the shared inodes stay as they were verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from attrs import frozen
from fleetpush.protocol.errors import VersionError
from fleetpush.protocol.versions import canonical_version

from .errors import StagingError

#: How many backups (one per apply) are kept; older ones are pruned.
KEEP_BACKUPS: Final = 5

#: Prefix of a backup directory that is still being written.
PARTIAL_PREFIX: Final = ".partial-"


def version_dir_name(version: str) -> str:
    """``version`` if it is a canonical version usable as a directory name.

    Raises :class:`StagingError` otherwise.
    """
    try:
        ok = canonical_version(version) == version
    except VersionError as e:
        raise StagingError(f"bad version {version!r}: {e}") from e
    if not ok or os.sep in version or version.startswith("."):
        raise StagingError(f"version {version!r} is not in canonical form")
    return version


@frozen
class StateLayout:
    """Paths inside one state directory (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, state_dir: str | os.PathLike[str]) -> StateLayout:
        return cls(Path(state_dir))

    @property
    def device_key(self) -> Path:
        return self.root / "device.key"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def state_backup(self) -> Path:
        return self.root / "state.json.bak"

    @property
    def journal(self) -> Path:
        return self.root / "journal.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def owner_lock(self) -> Path:
        return self.root / "owner.lock"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def child_record(self) -> Path:
        return self.root / "agent-child.json"

    @property
    def installed_dir(self) -> Path:
        return self.root / "installed"

    @property
    def installed_manifest(self) -> Path:
        return self.installed_dir / "manifest.signed"

    @property
    def updates_dir(self) -> Path:
        return self.root / "updates"

    def update_dir(self, version: str) -> Path:
        return self.updates_dir / version_dir_name(version)

    def staged_manifest(self, version: str) -> Path:
        return self.update_dir(version) / "manifest.signed"

    def staged_files(self, version: str) -> Path:
        return self.update_dir(version) / "files"

    def saved_args(self, version: str) -> Path:
        return self.update_dir(version) / "saved_args.json"

    def staged_marker(self, version: str) -> Path:
        return self.update_dir(version) / "STAGED"

    @property
    def backups_dir(self) -> Path:
        return self.root / "backups"

    def backup_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StagingError(f"bad backup name {name!r}")
        return self.backups_dir / name
