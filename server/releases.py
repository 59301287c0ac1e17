"""The release store: published releases, the status lifecycle, and what a device is offered.

A release is a signed manifest (its exact signed bytes, never re-encoded) plus
its files under ``<data_dir>/releases/<token>/``; :mod:`.publish` writes them,
this module reads them and changes their status.

Lifecycle (specs/PROTOCOL.md §7.7): ``draft -> pre-released -> approved``, and
``revoked`` from any state; setting the current status again is a no-op.
``paused`` (from ``pre-released`` or ``approved``, and back to either) is
what a halted deployment does to its release (§7.7.1): a paused release is
offered to no channel and cannot be pushed, and queued pushes of it are
cancelled on delivery; devices it was pushed to may still fetch it, so the
updates already running finish instead of failing half-way.
"""

from __future__ import annotations

import builtins
import time
from pathlib import Path
from typing import Final

from attrs import frozen
from fleetpush.protocol import FleetpushError, codec
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.messages import RELEASE_STATUSES, ReleaseInfo, Signature, SignedManifest
from fleetpush.protocol.versions import canonical_version, parse_version

from . import db
from .artifacts import is_remote
from .errors import IllegalTransition, NotFound

RELEASES_DIR: Final = "releases"
LIFECYCLE: Final = frozenset(
    {("draft", "pre-released"), ("pre-released", "approved")}
    | {(s, "revoked") for s in ("draft", "pre-released", "approved", "paused")}
    | {(s, "paused") for s in ("pre-released", "approved")}
    | {("paused", s) for s in ("pre-released", "approved")}
)
#: What each channel is offered by check_update.
CHANNEL_STATUSES: Final = {"stable": ("approved",), "beta": ("approved", "pre-released")}
#: Statuses a push may name (and devices may fetch a pushed release in).
PUSHABLE: Final = ("pre-released", "approved")


@frozen(kw_only=True)
class ReleaseRecord:
    app: str
    version: str
    sequence: int
    status: str
    created: float
    notes: str
    size: int
    files: int
    restart: bool
    min_version: str | None
    expires: int | None
    signed: SignedManifest
    #: absolute directory holding the release's files (for a release in an
    #: object store, its location as a path: a unique cache key, never opened).
    dir: Path
    #: the ``dir`` column as stored: relative to the data dir, or an
    #: ``s3://`` URL of an object store (artifacts.py, issue 15).
    location: str = ""

    @property
    def remote(self) -> bool:
        """True if the release's files are in an object store, not the data dir."""
        return is_remote(self.location)

    def info(self) -> ReleaseInfo:
        # The schema claims live in the signed manifest only (§7.3.2): read back
        # from the exact bytes the store verified when it was published.
        manifest = Manifest.from_bytes(self.signed.signed)
        return ReleaseInfo(
            app=self.app,
            version=self.version,
            sequence=self.sequence,
            status=self.status,
            created=self.created,
            notes=self.notes,
            size=self.size,
            files=self.files,
            restart=self.restart,
            schema_version=manifest.schema_version,
            min_schema=manifest.min_schema,
        )


class ReleaseStore:
    """Release rows in the database (one connection, one thread)."""

    def __init__(self, conn: db.Connection, data_dir: Path) -> None:
        self.conn = conn
        self.data_dir = Path(data_dir)

    @classmethod
    def open(cls, data_dir: Path) -> ReleaseStore:
        """A store with its own connection (for the CLI and other processes); close() it."""
        return cls(db.open_database(data_dir), data_dir)

    def close(self) -> None:
        self.conn.close()

    def _record(self, row: db.Row) -> ReleaseRecord:
        sigs = codec.unpackb(row["signatures"])
        return ReleaseRecord(
            app=row["app"],
            version=row["version"],
            sequence=row["sequence"],
            status=row["status"],
            created=row["created"],
            notes=row["notes"],
            size=row["size"],
            files=row["files"],
            restart=bool(row["restart"]),
            min_version=row["min_version"],
            expires=row["expires"],
            signed=SignedManifest(
                signed=bytes(row["manifest"]),
                signatures=[Signature(keyid=s["keyid"], sig=s["sig"]) for s in sigs],
            ),
            dir=Path(row["dir"]) if is_remote(row["dir"]) else self.data_dir / row["dir"],
            location=row["dir"],
        )

    def get(self, app: str, version: str) -> ReleaseRecord:
        """Raises :class:`NotFound`."""
        row = self.conn.execute(
            "SELECT * FROM releases WHERE app = ? AND version = ?", (app, _canonical(version))
        ).fetchone()
        if row is None:
            raise NotFound(f"no release {app} {version}")
        return self._record(row)

    def find(self, app: str, version: str) -> ReleaseRecord | None:
        try:
            return self.get(app, version)
        except NotFound:
            return None

    def status_of(self, app: str, version: str) -> str | None:
        row = self.conn.execute(
            "SELECT status FROM releases WHERE app = ? AND version = ?", (app, version)
        ).fetchone()
        return None if row is None else str(row[0])

    def list(self, app: str | None = None) -> list[ReleaseInfo]:
        if app is None:
            rows = self.conn.execute("SELECT * FROM releases ORDER BY app, sequence")
        else:
            rows = self.conn.execute(
                "SELECT * FROM releases WHERE app = ? ORDER BY sequence", (app,)
            )
        return [self._record(r).info() for r in rows]

    def highest_sequence(self, app: str, reset: int | None = None) -> int:
        """The sequence a new release of ``app`` must exceed.

        ``reset``: the newest root lowers ``app``'s sequence to this (§8.5): a
        revoked release above it (the fast-forward being recovered from) no
        longer counts.
        """
        if reset is None:
            row = self.conn.execute(
                "SELECT MAX(sequence) FROM releases WHERE app = ?", (app,)
            ).fetchone()
        else:
            row = self.conn.execute(
                "SELECT MAX(sequence) FROM releases WHERE app = ?"
                " AND NOT (status = 'revoked' AND sequence > ?)",
                (app, reset),
            ).fetchone()
        return int(row[0] or 0)

    def set_status(self, app: str, version: str, status: str, operator: str) -> ReleaseInfo:
        """Move a release along its lifecycle and record who did it when.

        Raises :class:`NotFound`, :class:`IllegalTransition`.
        """
        if status not in RELEASE_STATUSES:
            raise IllegalTransition(f"unknown release status {status!r}")
        with db.transaction(self.conn):
            record = self.get(app, version)
            if record.status == status:
                return record.info()
            if (record.status, status) not in LIFECYCLE:
                raise IllegalTransition(
                    f"{app} {record.version}: {record.status} -> {status} is not allowed "
                    "(draft -> pre-released -> approved; pre-released or approved <-> paused; "
                    "revoked from any state)"
                )
            self.conn.execute(
                "UPDATE releases SET status = ? WHERE app = ? AND version = ?",
                (status, app, record.version),
            )
            self.conn.execute(
                "INSERT INTO release_history (app, version, old_status, new_status, time, operator)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (app, record.version, record.status, status, time.time(), operator),
            )
        return self.get(app, version).info()

    def history(self, app: str, version: str) -> builtins.list[tuple[str | None, str, float, str]]:
        """(old status, new status, time, operator) for each change, oldest first."""
        rows = self.conn.execute(
            "SELECT old_status, new_status, time, operator FROM release_history"
            " WHERE app = ? AND version = ? ORDER BY id",
            (app, _canonical(version)),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def offer(
        self, *, app: str, channel: str, sequence: int, installed: str | None, now: float
    ) -> ReleaseRecord | None:
        """The newest release a device may be offered (check_update), or None.

        Same app; status allowed for the channel (unknown channels count as
        stable); sequence above the device's; not expired; ``min_version`` not
        above the installed version (a release the device could not apply is
        skipped, and an older one may be offered instead); never the installed
        version itself, whatever sequence the device announced.
        """
        statuses = CHANNEL_STATUSES.get(channel, CHANNEL_STATUSES["stable"])
        marks = ",".join("?" * len(statuses))
        rows = self.conn.execute(
            f"SELECT * FROM releases WHERE app = ? AND sequence > ? AND status IN ({marks})"  # noqa: S608
            " ORDER BY sequence DESC",
            (app, sequence, *statuses),
        )
        for row in rows:
            if row["expires"] is not None and now >= row["expires"]:
                continue
            if row["min_version"] is not None and not _at_least(installed, row["min_version"]):
                continue
            if installed is not None and _canonical(row["version"]) == _canonical(installed):
                # The newest release it may install is the one it runs: nothing to
                # offer (a fresh device announces sequence 0; issue 11, item 6).
                return None
            return self._record(row)
        return None


def _canonical(version: str) -> str:
    try:
        return canonical_version(version)
    except FleetpushError:
        return version


def _at_least(installed: str | None, minimum: str) -> bool:
    if installed is None:
        return False
    try:
        return parse_version(installed) >= parse_version(minimum)
    except FleetpushError:
        return False
