"""What a push and a deployment both check first: the release and the devices named.

``push`` (operator_api.py) and ``deploy_create`` (deploy_api.py) take the same
selector (devices, or a group, or all devices of the app; §7.7, §7.7.1) and
refuse the same releases, so the rules and their sentences live here once.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadRequest, Conflict
from .registry import DeviceRegistry
from .releases import PUSHABLE, ReleaseRecord, ReleaseStore


def pushable_release(releases: ReleaseStore, app: str, version: str, done: str) -> ReleaseRecord:
    """The release, if it may reach devices; ``done`` names the act ("pushed").

    Raises NotFound (no such release), Conflict (draft, revoked, paused).
    """
    record = releases.get(app, version)
    if record.status not in PUSHABLE:
        raise Conflict(
            f"{app} {record.version} is {record.status}: "
            f"only pre-released or approved releases are {done}"
        )
    return record


def named_targets(
    devices: DeviceRegistry,
    app: str,
    named: Sequence[str],
    group: str | None,
    everyone: bool,
    *,
    staged: str | None = None,
) -> list[str]:
    """The accepted devices of ``app`` the selector names, in the order given.

    Exactly one of ``named``, ``group`` and ``everyone``. A group or all are
    narrowed to accepted devices of the app (and, with ``staged``, to those
    that staged that version); a device named explicitly must be both.
    Raises BadRequest (not exactly one), NotFound (unknown device),
    Conflict (a named device not accepted, or of another app).
    """
    if sum((bool(named), group is not None, everyone)) != 1:
        raise BadRequest("name exactly one of: devices, group, all")
    if not named:
        return devices.accepted_ids(app, group, staged)
    targets: list[str] = []
    for device_id in dict.fromkeys(named):
        row = devices.require(device_id)
        if row["enrollment"] != "accepted":
            raise Conflict(f"device {device_id} is {row['enrollment']}, not accepted")
        if row["app"] != app:
            raise Conflict(f"device {device_id} runs {row['app']!r}, not {app!r}")
        targets.append(device_id)
    return targets
