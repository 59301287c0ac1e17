"""Deleting a revoked release for good: its row, then its files or objects (issue 15).

Revoking (releases.py, specs/PROTOCOL.md §7.7) stops a release being offered,
pushed or fetched, but keeps its bytes; purging frees them. Only a revoked
release may be purged, so nothing a device may still be sent disappears
under it. The row goes first, in its own transaction: from then on no
releaser serves the release, and files left behind by a failure after that
(a store that is down) are unreferenced, and removed by running the purge of
their location again (:func:`remove_files`). The status history is kept: it
is the audit trail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import db
from .artifacts import Artifacts, LocalStore, StoreOptions, remove_release
from .chunk_pack import pack_path
from .errors import IllegalTransition
from .releases import ReleaseStore


def purge_release(
    data_dir: Path, app: str, version: str, options: StoreOptions | None = None
) -> str:
    """Delete revoked release ``app`` ``version``: row, then files. Returns where they were.

    Raises :class:`NotFound`, :class:`IllegalTransition` (not revoked),
    :class:`ObjectStoreError` (the row is gone; the objects remain: purge
    them with :func:`remove_files`).
    """
    releases = ReleaseStore.open(data_dir)
    try:
        with db.transaction(releases.conn):
            record = releases.get(app, version)
            if record.status != "revoked":
                raise IllegalTransition(
                    f"{app} {record.version} is {record.status}: only a revoked release can "
                    f"be purged [fleetpush release revoke {app} {record.version}]"
                )
            releases.conn.execute(
                "DELETE FROM releases WHERE app = ? AND version = ? AND status = 'revoked'",
                (app, record.version),
            )
    finally:
        releases.close()
    remove_files(data_dir, record.location, options)
    return record.location


def remove_files(data_dir: Path, location: str, options: StoreOptions | None = None) -> None:
    """Remove the files of a release stored at ``location`` (a ``dir`` column value).

    Raises :class:`ObjectStoreError`.
    """
    store, name = Artifacts(data_dir, options).resolve(location)
    if isinstance(store, LocalStore):
        release_dir = Path(data_dir) / name
        pack_path(release_dir).unlink(missing_ok=True)
        shutil.rmtree(release_dir, ignore_errors=True)
        return
    remove_release(store, name)
