"""The message catalogue: envelopes and the typed params/results of every method.

The deployment methods' messages (§7.7.1) are in deployments.py and the
field validators in validators.py; both are re-exported here.

Wire envelopes follow msgpack-rpc (specs/PROTOCOL.md §3)::

    request      [0, id, method, params]
    response     [1, id, result]
    error        [2, id, code, message, data]
    notification [3, method, params]

Ids are unsigned 32-bit and per direction: each side numbers its own requests.
Params and results are maps whose fields are given by the frozen, keyword-only
attrs classes below; :data:`METHODS` maps each wire method name to them.
Unknown keys in params/results are ignored (§3.3), so peers may add fields.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

import attrs
from attrs import field, frozen
from attrs.validators import deep_mapping, instance_of, max_len, optional

# Re-exported: the supervised app's and the deployment messages (§7.6, §7.7.1)
# and the validators live beside this module.
from .app_messages import (
    APP_ACTIONS,
    APP_STATES,
    MAX_APP_TARGETS,
    MAX_LOG_LINE,
    MAX_LOG_LINES,
    AppCommand,
    AppControl,
    AppControlOutcome,
    AppControlResult,
    AppLogLines,
    AppLogs,
    AppStatus,
)
from .codec import OMIT_NONE
from .deployments import (
    DEPLOYMENT_DEVICE_STATES,
    DEPLOYMENT_STATES,
    MAX_DEPLOY_DEVICES,
    MAX_PHASES,
    ON_HALT,
    DeployCreate,
    DeployFilter,
    DeployList,
    DeploymentDevice,
    DeploymentInfo,
    DeployRef,
    DeployShow,
)
from .limits import DEFAULT_PAGE, MAX_CHUNKS_PER_REQUEST, MAX_FILES, MAX_PAGE, MAX_WIRE_INT
from .validators import COUNT, float_range, int_range, one_of

#: Fields added to a message after protocol 1.0 was fixed are absent when unset,
#: so an older peer's bytes (and specs/vectors) do not change (§3.3).
_OMIT: Final = {"fleetpush.omit_none": True}


class Kind(Enum):
    REQUEST = 0
    RESPONSE = 1
    ERROR = 2
    NOTIFICATION = 3


# --- handshake (§5) ------------------------------------------------------------

ROLES: Final = ("device", "operator")


@frozen(kw_only=True)
class Hello:
    protocol_version: str
    role: str = field(validator=one_of(ROLES))
    #: device id (devices) or operator name (operators), as claimed.
    peer_id: str = field(validator=max_len(256))
    #: raw 32-byte Ed25519 public key that will sign the nonce.
    public_key: bytes = field(validator=max_len(32))
    app: str | None = None
    version: str | None = None
    channel: str | None = None
    sequence: int = field(default=0, validator=COUNT)
    group: str | None = None
    capabilities: list[str] = field(factory=list)
    #: the device's own fresh nonce, bound into the freshness statement (§8.6); absent: none.
    nonce: bytes | None = field(default=None, validator=optional(max_len(32)), metadata=_OMIT)


@frozen(kw_only=True)
class HelloResult:
    protocol_version: str
    server_id: str
    cid: str
    heartbeat: float
    nonce: bytes
    capabilities: list[str] = field(factory=list)
    #: the newest root the releaser serves (§8.5); absent: it serves none.
    root_version: int | None = field(default=None, validator=optional(COUNT), metadata=_OMIT)
    #: a freshness statement bound to the hello's nonce (§8.6); absent: none.
    freshness: SignedManifest | None = field(default=None, metadata=_OMIT)


@frozen(kw_only=True)
class Auth:
    #: Ed25519 signature over :func:`fleetpush.protocol.auth.auth_payload`.
    signature: bytes = field(validator=max_len(64))


ENROLLMENT_STATES: Final = ("accepted", "pending", "rejected")


@frozen(kw_only=True)
class AuthResult:
    status: str = field(validator=one_of(ENROLLMENT_STATES))


@frozen(kw_only=True)
class Empty:
    """Params or result with no fields."""


@frozen(kw_only=True)
class Bye:
    #: a close code (specs/PROTOCOL.md §9.2), u16 as in WebSocket
    code: int = field(validator=int_range(0, 0xFFFF))
    reason: str = ""


# --- updates (§7) --------------------------------------------------------------


@frozen(kw_only=True)
class SignedManifest:
    """A manifest as it travels: the exact signed bytes plus signatures (§8.3)."""

    signed: bytes
    signatures: list[Signature]


@frozen(kw_only=True)
class Signature:
    keyid: str
    sig: bytes = field(validator=max_len(64))


@frozen(kw_only=True)
class CheckUpdate:
    app: str
    version: str
    channel: str = "stable"
    sequence: int = field(default=0, validator=COUNT)


@frozen(kw_only=True)
class CheckUpdateResult:
    available: bool
    version: str | None = None
    sequence: int | None = field(default=None, validator=optional(COUNT))
    manifest: SignedManifest | None = None
    status: str | None = None


@frozen(kw_only=True)
class GetManifest:
    app: str
    version: str


@frozen(kw_only=True)
class GetManifestResult:
    manifest: SignedManifest
    status: str


def _u32_pairs(_inst: object, _attr: object, value: list[tuple[int, int]]) -> None:
    # They go back into the u32 fields of DATA frames (§2.3).
    for pair in value:
        if not all(0 <= i <= 0xFFFFFFFF for i in pair):
            raise ValueError(f"chunk {pair} has an index outside the u32 range")


@frozen(kw_only=True)
class GetChunks:
    app: str
    version: str
    #: (file index, chunk index) pairs, answered in order by DATA frames.
    chunks: list[tuple[int, int]] = field(validator=[max_len(MAX_CHUNKS_PER_REQUEST), _u32_pairs])


@frozen(kw_only=True)
class GetChunksResult:
    sent: int = field(validator=int_range(0, MAX_CHUNKS_PER_REQUEST))


@frozen(kw_only=True)
class UpdateCommand:
    """Params of ``__force_update__`` and ``__apply_update__`` (§7.4)."""

    app: str
    version: str
    restart: bool
    push_id: str = ""
    #: a freshness statement naming this command (§8.6, §7.4); absent: unsigned.
    freshness: SignedManifest | None = field(default=None, metadata=_OMIT)


@frozen(kw_only=True)
class GetRoot:  # §8.5
    version: int = field(validator=int_range(1, MAX_WIRE_INT))


@frozen(kw_only=True)
class GetRootResult:
    root: SignedManifest


@frozen(kw_only=True)
class GetFreshness:  # §8.6: a fresh device nonce to answer
    nonce: bytes = field(validator=max_len(32))


@frozen(kw_only=True)
class GetFreshnessResult:
    freshness: SignedManifest


@frozen(kw_only=True)
class Ack:
    accepted: bool
    reason: str = ""


PROGRESS_STATES: Final = (
    "idle",
    "checking",
    "downloading",
    "verifying",
    "staged",
    # The steps of an apply under the agent, in order (§7.6; issue 12).
    "preparing_env",
    "backing_up",
    "stopping",
    "installing",
    "migrating",
    "starting",
    "rolling_back",
    "applying",
    "restarting",
    "trial",
    "committed",
    "rolled_back",
    "failed",
    # the newest freshness statement expired: updates may be withheld (§8.6)
    "stale",
    "deferred",
    "up_to_date",
)


@frozen(kw_only=True)
class UpdateProgress:
    state: str = field(validator=one_of(PROGRESS_STATES, "§7.6"))
    app: str = ""
    version: str = ""
    push_id: str = ""
    bytes_done: int = field(default=0, validator=COUNT)
    bytes_total: int = field(default=0, validator=COUNT)
    error: str | None = None


#: The most outcomes one ``report_outcomes`` carries (a device keeps at most
#: 50 in its history, client/state.py MAX_HISTORY).
MAX_OUTCOMES: Final = 64


@frozen(kw_only=True)
class Outcome:
    """One entry of a device's outcome history (§7.6.1), sent until acknowledged."""

    #: stable for the entry's life on the device: a re-sent entry has the same id.
    report_id: str = field(validator=max_len(64))
    #: the device's history event ("committed", "rolled-back", "repaired"...).
    event: str = field(validator=max_len(64))
    time: float
    #: the update_progress state it stands for, "" for other events.
    state: str = field(default="", validator=one_of(("", *PROGRESS_STATES), "§7.6"))
    app: str = ""
    version: str = ""
    push_id: str = ""
    error: str | None = None


@frozen(kw_only=True)
class ReportOutcomes:
    """Params of ``report_outcomes`` (§7.6.1)."""

    reports: list[Outcome] = field(validator=max_len(MAX_OUTCOMES))


@frozen(kw_only=True)
class ReportOutcomesResult:
    """The report ids now committed by the releaser (duplicates included)."""

    acknowledged: list[str] = field(validator=max_len(MAX_OUTCOMES))


@frozen(kw_only=True)
class StatusResult:
    server_id: str
    server_version: str
    uptime: float
    connected: int = field(validator=COUNT)
    by_version: dict[str, int] = field(
        factory=dict, validator=deep_mapping(instance_of(str), COUNT)
    )
    by_state: dict[str, int] = field(factory=dict, validator=deep_mapping(instance_of(str), COUNT))
    #: the releaser's data dir is short of space: it stores no new history (issue 10, item 2)
    low_disk: bool = False


# --- operator methods (§7.7) ----------------------------------------------------


@frozen(kw_only=True)
class DeviceFilter:
    app: str | None = None
    group: str | None = None
    after: str | None = None
    limit: int = field(default=DEFAULT_PAGE, validator=int_range(1, MAX_PAGE))
    #: only devices in this update state (§7.6), with this installed version,
    #: connected (True) or not (False) now.
    state: str | None = None
    version: str | None = None
    connected: bool | None = None


@frozen(kw_only=True)
class DeviceInfo:
    device_id: str
    public_key: bytes
    enrollment: str
    app: str | None
    version: str | None
    channel: str | None
    group: str | None
    state: str
    connected: bool
    first_seen: float
    last_seen: float
    #: ``{state, version, error, time}`` of the last finished update (§7.9).
    last_result: dict[str, Any] | None = None
    bytes_done: int = field(default=0, validator=COUNT)
    bytes_total: int = field(default=0, validator=COUNT)
    app_status: dict[str, Any] | None = None
    #: the version on trial (installed and running, not committed yet), else None.
    trial_version: str | None = None
    #: set when two devices were found using this id (§5.5): one sentence naming both addresses.
    duplicate: str | None = None
    #: the releaser the device is connected to (its address), whichever one
    #: answers (§7.7, issue 15); absent when not connected.
    releaser: str | None = field(default=None, metadata=_OMIT)
    #: the ``error`` of the device's last update_progress, e.g. why it is
    #: ``deferred`` (§7.6); nil when that report carried none.
    state_error: str | None = None


@frozen(kw_only=True)
class DeviceList:
    devices: list[DeviceInfo]
    next: str | None = None


@frozen(kw_only=True)
class GetDevice:
    device_id: str
    #: how many of the device's newest events to include.
    history: int = field(default=50, validator=int_range(0, MAX_PAGE))


@frozen(kw_only=True)
class Delivery:
    """One push to one device (``push_targets``; §7.7)."""

    push_id: str
    version: str
    mode: str
    #: delivery: queued, sent, accepted, refused, error, timeout, superseded.
    state: str
    detail: str = ""
    #: the device's last progress state for this push.
    result: str | None = None
    updated: float = 0.0


@frozen(kw_only=True)
class DeviceDetail:
    """``get_device``: everything known of one device (§7.7)."""

    device: DeviceInfo
    #: its newest events, oldest first.
    history: list[Event] = field(factory=list)
    #: its newest pushes, newest first (at most 50).
    deliveries: list[Delivery] = field(factory=list)


@frozen(kw_only=True)
class EventFilter:
    """``list_events``: the stored history, newest first, a page at a time (§7.7)."""

    device_id: str | None = None
    #: event kinds to keep (empty: every kind).
    kinds: list[str] = field(factory=list, validator=max_len(32))
    #: only events at or after this Unix time.
    since: float | None = None
    #: only events with a seq below this (the previous page's ``next``).
    before: int | None = field(default=None, validator=optional(COUNT))
    #: only events whose data names this push or deployment id.
    push_id: str | None = None
    limit: int = field(default=DEFAULT_PAGE, validator=int_range(1, MAX_PAGE))


@frozen(kw_only=True)
class EventList:
    events: list[Event]
    next: int | None = field(default=None, validator=optional(COUNT))


@frozen(kw_only=True)
class ForgetDevice:
    device_id: str
    #: disconnect the device if it is connected (else a connected one is refused)
    force: bool = False


@frozen(kw_only=True)
class ForgetResult:
    device_id: str
    disconnected: bool


@frozen(kw_only=True)
class Enrollment:
    device_id: str
    decision: str = field(validator=one_of(("accepted", "rejected")))


#: ``paused`` (§7.7): offered to no channel and pushed to no device until set
#: back to the status it had; a deployment's halt rule sets it (§7.7.1).
RELEASE_STATUSES: Final = ("draft", "pre-released", "approved", "paused", "revoked")


@frozen(kw_only=True)
class ReleaseFilter:
    app: str | None = None
    after: str | None = None
    limit: int = field(default=DEFAULT_PAGE, validator=int_range(1, MAX_PAGE))


@frozen(kw_only=True)
class ReleaseInfo:
    app: str
    version: str
    sequence: int = field(validator=COUNT)
    status: str
    created: float
    notes: str
    size: int = field(validator=COUNT)
    files: int = field(validator=int_range(0, MAX_FILES))
    restart: bool
    #: the manifest's data schema claims (§7.3.2); absent when it makes none.
    schema_version: int | None = field(
        default=None, validator=optional(COUNT), metadata={OMIT_NONE: True}
    )
    min_schema: int | None = field(
        default=None, validator=optional(COUNT), metadata={OMIT_NONE: True}
    )


@frozen(kw_only=True)
class ReleaseList:
    releases: list[ReleaseInfo]
    next: str | None = None


@frozen(kw_only=True)
class SetReleaseStatus:
    app: str
    version: str
    status: str = field(validator=one_of(RELEASE_STATUSES))


PUSH_MODES: Final = ("force", "stage", "apply")


@frozen(kw_only=True)
class Push:
    app: str
    version: str
    mode: str = field(validator=one_of(PUSH_MODES))
    restart: bool | None = None
    devices: list[str] = field(factory=list)
    group: str | None = None
    all: bool = False


@frozen(kw_only=True)
class PushResult:
    push_id: str
    targets: list[str]
    sent: list[str]
    queued: list[str]


@frozen(kw_only=True)
class Watch:
    history: int = field(default=0, validator=COUNT)


@frozen(kw_only=True)
class Event:
    """A fleet event relayed to watching operators (``event`` notification)."""

    seq: int = field(validator=COUNT)
    time: float
    kind: str
    device_id: str | None = None
    data: dict[str, Any] = field(factory=dict)


# --- the catalogue -----------------------------------------------------------------


@frozen
class MethodSpec:
    name: str
    kind: Kind  # REQUEST (has a result) or NOTIFICATION
    params: type
    result: type | None
    #: who may *send* it (§7.9): "client", "device", "operator", "server" or
    #: "peer"; checked by :func:`fleetpush.protocol.handshake.may_send`. Which
    #: methods are allowed before OPEN is the state machine's business (state.py).
    sender: str


def _spec(name: str, params: type, result: type | None, sender: str) -> tuple[str, MethodSpec]:
    kind = Kind.REQUEST if result is not None else Kind.NOTIFICATION
    return name, MethodSpec(name, kind, params, result, sender)


METHODS: Final[dict[str, MethodSpec]] = dict(
    [
        _spec("hello", Hello, HelloResult, "client"),
        _spec("auth", Auth, AuthResult, "client"),
        _spec("bye", Bye, None, "peer"),
        _spec("ping", Empty, Empty, "peer"),
        _spec("status", Empty, StatusResult, "client"),
        _spec("check_update", CheckUpdate, CheckUpdateResult, "device"),
        _spec("get_manifest", GetManifest, GetManifestResult, "device"),
        _spec("get_chunks", GetChunks, GetChunksResult, "device"),
        _spec("get_root", GetRoot, GetRootResult, "device"),
        _spec("get_freshness", GetFreshness, GetFreshnessResult, "device"),
        _spec("update_progress", UpdateProgress, None, "device"),
        _spec("app_status", AppStatus, None, "device"),
        _spec("report_outcomes", ReportOutcomes, ReportOutcomesResult, "device"),
        _spec("__force_update__", UpdateCommand, Ack, "server"),
        _spec("__apply_update__", UpdateCommand, Ack, "server"),
        _spec("list_devices", DeviceFilter, DeviceList, "operator"),
        _spec("get_device", GetDevice, DeviceDetail, "operator"),
        _spec("list_events", EventFilter, EventList, "operator"),
        _spec("set_enrollment", Enrollment, DeviceInfo, "operator"),
        _spec("forget_device", ForgetDevice, ForgetResult, "operator"),
        _spec("list_releases", ReleaseFilter, ReleaseList, "operator"),
        _spec("set_release_status", SetReleaseStatus, ReleaseInfo, "operator"),
        _spec("push", Push, PushResult, "operator"),
        _spec("watch", Watch, Empty, "operator"),
        _spec("deploy_create", DeployCreate, DeploymentInfo, "operator"),
        _spec("deploy_list", DeployFilter, DeployList, "operator"),
        _spec("deploy_show", DeployShow, DeploymentInfo, "operator"),
        _spec("deploy_pause", DeployRef, DeploymentInfo, "operator"),
        _spec("deploy_resume", DeployRef, DeploymentInfo, "operator"),
        _spec("deploy_abort", DeployRef, DeploymentInfo, "operator"),
        _spec("app_control", AppControl, AppControlResult, "operator"),
        _spec("app_logs", AppLogs, AppLogLines, "operator"),
        _spec("__app_control__", AppCommand, AppStatus, "server"),
        _spec("__app_logs__", AppLogs, AppLogLines, "server"),
        _spec("app_log", AppLogLines, None, "device"),
        _spec("event", Event, None, "server"),
    ]
)


__all__ = [name for name, obj in list(globals().items()) if attrs.has(obj)] + [
    "MAX_OUTCOMES",
    "METHODS",
    "Kind",
    "MethodSpec",
    "float_range",
    "int_range",
    "one_of",
]
# Named one by one so type checkers see them re-exported (the list above is built at run time).
__all__ += [
    "APP_ACTIONS",
    "APP_STATES",
    "COUNT",
    "DEFAULT_PAGE",
    "DEPLOYMENT_DEVICE_STATES",
    "DEPLOYMENT_STATES",
    "MAX_APP_TARGETS",
    "MAX_DEPLOY_DEVICES",
    "MAX_LOG_LINE",
    "MAX_LOG_LINES",
    "MAX_PAGE",
    "MAX_PHASES",
    "ON_HALT",
    "AppCommand",
    "AppControl",
    "AppControlOutcome",
    "AppControlResult",
    "AppLogLines",
    "AppLogs",
    "AppStatus",
    "DeployCreate",
    "DeployFilter",
    "DeployList",
    "DeployRef",
    "DeployShow",
    "DeploymentDevice",
    "DeploymentInfo",
]
