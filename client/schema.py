"""The data schema: what the device's data is at, and whether a release may run on it.

A release declares ``schema_version`` (the data schema its code writes) and
``min_schema`` (the oldest it can migrate from), specs/PROTOCOL.md §7.3.2.
The device records the schema its data is at in ``<state>/data-schema.json``
(``{"schema": 2, "version": "1.3.0"}``: the schema, and the release that
brought the data there), written in the same journaled step that makes a
release installed (recovery.py's ``finish_apply`` / ``finish_rollback``),
so it never disagrees with the installed version for longer than a crash,
which recovery finishes. When nothing is recorded, it is the installed
release's ``schema_version`` (None: unknown).

:func:`decide` is the pure compatibility rule (facts in, a
:class:`SchemaVerdict` out), as trial.py's ``evaluate`` is for trials.
"""

from __future__ import annotations

import enum
from typing import Final

from attrs import frozen
from fleetpush.protocol.errors import VersionError
from fleetpush.protocol.manifest import Manifest
from fleetpush.protocol.versions import parse_version

from .errors import StagingError, StateError
from .fsutil import atomic_write_json, read_json
from .layout import StateLayout
from .staging import load_installed_manifest

#: In the state dir: the schema the app's data is at.
SCHEMA_FILE: Final = "data-schema.json"


class SchemaRefused(StagingError):
    """The release cannot run on this device's data (nothing was touched)."""


class Verdict(enum.Enum):
    #: the release makes no schema claim: nothing to check or migrate.
    NO_CLAIM = "no-claim"
    #: the data is at the release's schema already.
    CURRENT = "current"
    #: migrate from ``data`` (None: unknown) to the release's schema.
    MIGRATE = "migrate"
    REFUSE_NEWER = "refuse-newer"
    REFUSE_OLDER = "refuse-older"


@frozen(kw_only=True)
class SchemaVerdict:
    verdict: Verdict
    #: the data's schema now (None: unknown) and the schema after the apply.
    data: int | None
    target: int | None
    #: for a refusal: one sentence, what and why, with a hint.
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.verdict in (Verdict.REFUSE_NEWER, Verdict.REFUSE_OLDER)


def decide(data: int | None, manifest: Manifest, written_by: str | None = None) -> SchemaVerdict:
    """May ``manifest``'s release run on data at schema ``data``? (pure)

    ``written_by`` is the release that brought the data to its schema, if
    known: a release refused because the data is too new names it as the one
    to install. Data of unknown schema is never refused (nothing to compare);
    the migration is then told ``FLEETPUSH_SCHEMA_FROM=""`` and decides itself.
    """
    target, oldest, version = manifest.schema_version, manifest.min_schema, manifest.version
    if target is None:
        return SchemaVerdict(verdict=Verdict.NO_CLAIM, data=data, target=data)
    if data is None:
        return SchemaVerdict(verdict=Verdict.MIGRATE, data=None, target=target)
    if data > target:
        if written_by is not None and _newer(written_by, version):
            hint = f"install {written_by} or later"
        else:
            hint = f"install a release with schema_version {data} or later"
        return SchemaVerdict(
            verdict=Verdict.REFUSE_NEWER,
            data=data,
            target=target,
            reason=f"data schema {data} is newer than what {version} supports (≤ {target}): {hint}",
        )
    if oldest is not None and data < oldest:
        return SchemaVerdict(
            verdict=Verdict.REFUSE_OLDER,
            data=data,
            target=target,
            reason=(
                f"data schema {data} is older than what {version} can migrate from (≥ {oldest}): "
                f"first install a release that migrates schema {data} to {oldest} or later "
                f"(its min_schema ≤ {data}), then {version}"
            ),
        )
    if data == target:
        return SchemaVerdict(verdict=Verdict.CURRENT, data=data, target=target)
    return SchemaVerdict(verdict=Verdict.MIGRATE, data=data, target=target)


def _newer(a: str, b: str) -> bool:
    try:
        return parse_version(a) > parse_version(b)
    except VersionError:
        return False


# --- the record ----------------------------------------------------------------------------


@frozen(kw_only=True)
class SchemaRecord:
    schema: int | None
    #: the release that brought the data to ``schema`` (None: not known).
    version: str | None = None


def describe_record(layout: StateLayout) -> str | None:
    """``status``'s ``data_schema``: ``"2 (since 3.0.0)"``, None when no schema is known.

    Reads only; an unreadable record is described, not raised.
    """
    try:
        record = read_record(layout)
    except StateError as e:
        return f"unreadable: {e}"
    if record.schema is None:
        return None
    return f"{record.schema} (since {record.version})" if record.version else str(record.schema)


def read_record(layout: StateLayout) -> SchemaRecord:
    """What the data is at: the record, else the installed release's ``schema_version``.

    Raises :class:`StateError` if the record or the installed manifest is
    unreadable (better to refuse than to migrate data of an unknown schema
    with a wrong ``FLEETPUSH_SCHEMA_FROM``).
    """
    path = layout.root / SCHEMA_FILE
    try:
        doc = read_json(path)
    except FileNotFoundError:
        installed = load_installed_manifest(layout.root)
        if installed is None or installed[1].schema_version is None:
            return SchemaRecord(schema=None)
        m = installed[1]
        return SchemaRecord(schema=m.schema_version, version=m.version)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"{path} is corrupt: {e}") from e
    schema, version = (doc.get("schema"), doc.get("version")) if isinstance(doc, dict) else (0, 0)
    if (schema is not None and (isinstance(schema, bool) or not isinstance(schema, int))) or (
        version is not None and not isinstance(version, str)
    ):
        raise StateError(f"{path} has the wrong shape")
    return SchemaRecord(schema=schema, version=version)


def write_record(layout: StateLayout, record: SchemaRecord) -> None:
    """Persist the data's schema atomically (idempotent: recovery repeats it)."""
    atomic_write_json(
        layout.root / SCHEMA_FILE, {"schema": record.schema, "version": record.version}, 0o600
    )


__all__ = [
    "SCHEMA_FILE",
    "SchemaRecord",
    "SchemaRefused",
    "SchemaVerdict",
    "Verdict",
    "decide",
    "read_record",
    "write_record",
]
